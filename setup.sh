#!/usr/bin/env bash
# One-time set-up on a Debian machine: system packages (as root, or through sudo) and the project venv.
# Idempotent: does nothing that is already done. Used by ./demo, ./run-tests and .ci/run.
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv qemu-utils qemu-system-common
          libvhdi-utils fio e2fsprogs dosfstools util-linux systemd kmod)
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/vhdxfs ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: creating .venv and installing vhdxfs with its test extra" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e '.[test]'
  touch .venv/.installed
fi
