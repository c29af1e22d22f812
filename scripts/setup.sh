#!/usr/bin/env bash
# Installs what fedfmx-edge needs on a Debian / Raspberry Pi OS / JetPack machine.
#   bash scripts/setup.sh            # runtime (aggregator, simulate): apt packages + the package
#   bash scripts/setup.sh --dev      # runtime + test and lint tools (+ chromium, systemd for CI)
#   bash scripts/setup.sh --device [--system-site-packages] [--venv DIR]
#                                    # a device: a virtual environment (default .venv) with
#                                    # PyTorch's CPU-only wheel, never the multi-GB CUDA build
# --system-site-packages lets the venv see apt's python3-picamera2 (Raspberry Pi cameras).
set -euo pipefail
cd "$(dirname "$0")/.."

mode="runtime"
venv=".venv"
site_packages=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) mode="dev" ;;
    --device) mode="device" ;;
    --system-site-packages) site_packages="--system-site-packages" ;;
    --venv) venv="$2"; shift ;;
    *) echo "setup: unknown option $1 (use --dev, --device, --system-site-packages, --venv DIR)" >&2
       exit 2 ;;
  esac
  shift
done

case "$mode" in
  runtime) APT_PACKAGES="dataset-fashion-mnist mosquitto" ;;
  # chromium: the status page test; systemd: `systemd-analyze verify` of deploy/systemd/.
  dev) APT_PACKAGES="dataset-fashion-mnist mosquitto chromium systemd" ;;
  device) APT_PACKAGES="python3-venv" ;;
esac
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

if [ "$mode" != "device" ]; then
  extra=""
  [ "$mode" = "dev" ] && extra="[dev]"
  python3 -m pip install --quiet --disable-pip-version-check -e ".${extra}"
  exit 0
fi

# --- a device: venv, CPU torch first, then the package --------------------------------------
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
torch_pin="$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')"
python3 -m venv $site_packages "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# A short probe, so a machine without internet (or behind a wheel cache) is not held up.
if "$venv/bin/python" -c "import urllib.request as u; u.urlopen('$TORCH_CPU_INDEX/torch/', timeout=5)" \
    >/dev/null 2>&1; then
  echo "setup: $torch_pin from PyTorch's CPU index"
  "${pip[@]}" --index-url "$TORCH_CPU_INDEX" "$torch_pin"
else
  echo "setup: $TORCH_CPU_INDEX unreachable; $torch_pin from the default index" \
       "(on a Pi or Jetson that is the CUDA build: check with scripts/check_device_wheels.py)" >&2
  "${pip[@]}" "$torch_pin"
fi
# Editable: the device profiles (device_configs/) are read from the checkout, not packaged.
"${pip[@]}" -e .
"$venv/bin/python" -c "import torch; print('setup: torch', torch.__version__, \
'CUDA build' if torch.version.cuda else 'CPU build')"
echo "setup: done; run $venv/bin/fedfmx-edge doctor --config device.yaml"
