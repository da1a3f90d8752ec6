#!/usr/bin/env bash
# One-time set-up on a Debian machine: system packages (as root, or through sudo) and the project venv.
# Idempotent: does nothing that is already done. Used by ./demo, ./run-tests and .ci/run.
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv qemu-utils qemu-system-common
          libvhdi-utils fio e2fsprogs dosfstools util-linux systemd kmod
          libnbd-bin nbd-client openssl man-db bash-completion debootstrap systemd-container
          ceph-mon ceph-osd radosgw ceph-common)  # the last four: the RADOS Gateway the S3 tests run against
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

[ -x .venv/bin/python ] || python3 -m venv .venv

# pyfuse3 3.5.0 has no fallocate handler, so discard (fallocate PUNCH_HOLE) could not reach us, and its
# request loop costs a trip through epoll per request: build it from its sdist with
# packaging/patch_pyfuse3.py applied (README, "Stack"); rebuilt whenever the patch level goes up.
level="$(sed -n 's/^PATCH_LEVEL = //p' packaging/patch_pyfuse3.py)"
if ! .venv/bin/python -c "import pyfuse3, sys; sys.exit(getattr(pyfuse3, 'VHDXFS_PATCH_LEVEL', 0) < $level)" \
    2>/dev/null; then
  echo "setup: building pyfuse3 3.5.0 with vhdxfs's patches (level $level)" >&2
  work="$(mktemp -d)"
  .venv/bin/pip download -q --no-deps --no-binary :all: pyfuse3==3.5.0 -d "$work"
  tar -xzf "$work"/pyfuse3-3.5.0.tar.gz -C "$work"
  .venv/bin/python packaging/patch_pyfuse3.py "$work/pyfuse3-3.5.0"
  .venv/bin/pip install -q "$work/pyfuse3-3.5.0"
  rm -rf "$work"
fi

if [ ! -x .venv/bin/vhdxfs ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: installing vhdxfs with its test and s3 extras into .venv" >&2
  .venv/bin/pip install -q -e '.[test,s3]'
  touch .venv/.installed
fi

# Manual pages and bash completion (generated from the parsers: packaging/make_docs.py), so that
# `man vhdxfs` and completion work in a fresh shell. Copied only when they changed.
install_doc() {  # SRC DST
  if ! cmp -s "$1" "$2" 2>/dev/null; then $SUDO install -D -m 0644 "$1" "$2"; fi
}
install_doc packaging/man/vhdxfs.1 /usr/local/share/man/man1/vhdxfs.1
install_doc packaging/man/mount.fuse.vhdxfs.8 /usr/local/share/man/man8/mount.fuse.vhdxfs.8
install_doc packaging/completion/vhdxfs /usr/local/share/bash-completion/completions/vhdxfs
