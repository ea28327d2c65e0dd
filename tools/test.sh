#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs everything, then runs pytest
# (unit tests on raw dumps, integration tests that boot QEMU guests and drive a real gdb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
