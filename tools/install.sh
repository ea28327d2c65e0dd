#!/usr/bin/env bash
# Installs everything gdbhandles and its tests need on a Debian 12 machine (run as root):
# QEMU, qemu-img, nasm, gdb from Debian, and a venv (.venv) built on the system Python, which is the
# Python gdb embeds, so gdb can load the venv's packages. Fast when all is installed already.
# apt's log goes to a private directory (mktemp -d, mode 0700) that is removed at exit; if that
# first attempt fails, `apt-get update` and the retry print to the terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
logdir=$(mktemp -d)
trap 'rm -rf "$logdir"' EXIT
pkgs="qemu-system-x86 qemu-utils nasm gdb python3 python3-venv python3-pip"
if ! apt-get install -y -qq --no-install-recommends $pkgs >"$logdir/apt.log" 2>&1; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends $pkgs
fi
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
