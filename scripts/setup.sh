#!/usr/bin/env bash
# Installs what fedfmx-edge needs on a Debian / Raspberry Pi OS machine: the Fashion-MNIST
# package and the Mosquitto broker (apt, when run as root), then the Python package itself.
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --dev    # runtime + test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="dataset-fashion-mnist mosquitto"
missing=""
for package in $APT_PACKAGES; do
  dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing$missing with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "setup: missing system packages:$missing — run: sudo apt-get install -y$missing" >&2
  fi
fi

extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
# torch==2.13.0 is pinned in pyproject.toml: pip takes the CPU build, never a multi-GB CUDA one.
python3 -m pip install --quiet --disable-pip-version-check -e ".${extra}"
