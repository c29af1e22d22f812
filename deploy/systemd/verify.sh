#!/usr/bin/env bash
# `systemd-analyze verify` on the units. It insists that ExecStart's binary exists: where the
# pilot prefix (/opt/fedfmx-edge/.venv) is not installed, the units are checked with the
# prefix replaced by this machine's `fedfmx-edge` (nothing else changes).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "verify: systemd-analyze missing (apt-get install -y systemd)" >&2
  exit 1
fi
prefix="/opt/fedfmx-edge/.venv/bin/fedfmx-edge"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
installed="$prefix"
if [ ! -x "$prefix" ]; then
  installed="$(command -v fedfmx-edge || true)"
  [ -n "$installed" ] || { echo "verify: fedfmx-edge is not installed" >&2; exit 1; }
fi
for unit in "$here"/*.service; do
  sed "s|$prefix|$installed|g" "$unit" > "$scratch/$(basename "$unit")"
done
# Strict: systemd only warns (and ignores the line) on an unknown key or a bad value, so any
# output at all is a failure.
if ! report="$(systemd-analyze verify --man=no "$scratch"/*.service 2>&1)" || [ -n "$report" ]; then
  echo "$report" >&2
  echo "verify: FAILED" >&2
  exit 1
fi
echo "verify: $(ls "$here"/*.service | wc -l) units valid"
