#!/usr/bin/env bash
# Install whatever fluidfs needs that is missing on Debian 12, then the package into .venv
# with the dependency versions pinned in contrib/constraints.txt (the ones last tested).
# Safe to run again: it only does what is not done yet. Usage: bash contrib/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv rsync attr iproute2 iptables nftables miniupnpd
  chromium chromium-driver systemd)  # the last three: browser tests, unit verification
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ ! -e /dev/fuse ]; then
  $SUDO modprobe fuse 2>/dev/null || true
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
# The stamp holds the checksum of what the install was made from: editing either file
# (a new dependency, a new pinned version) reinstalls, whatever the files' mtimes say.
stamp=".venv/.fluidfs-installed"
wanted="$(cat pyproject.toml contrib/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "setup: installing fluidfs and its pinned dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -c contrib/constraints.txt -e '.[test]'
  echo "$wanted" > "$stamp"
fi
# An editable install leaves fluidfs's bytecode to its first run, which environments with
# PYTHONDONTWRITEBYTECODE never write: every node, mount and CLI process would compile the
# stack again (~0.15 s CPU each). Compile it now, as a wheel install does.
.venv/bin/python -m compileall -q fluidfs >/dev/null
