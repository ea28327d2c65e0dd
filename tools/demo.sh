#!/usr/bin/env bash
# The main job on the default test guest: install, build the guest, boot it under QEMU, attach gdb
# with the extension, then `handle info`, `handle ps`, a walk and a lookup, each printed after the
# command as typed at gdb's prompt (the README's "A session" is this output).
#   PROFILE=7601|19041|22000|...  the build (default 19041)
#   PYTHON=...                    the Python with gdbhandles' dependencies (default .venv/bin/python)
#   --no-install                  skip tools/install.sh (everything is installed already)
# Exits 0 when every command succeeded; the build/boot log is shown only on failure and removed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = --no-install ] || bash tools/install.sh
python=${PYTHON:-.venv/bin/python}
profile=${PROFILE:-19041}
out=vm-images/out/default-$profile
work=$(mktemp -d)
log=$work/boot.log
boot=
cleanup() {
    if [ -n "$boot" ]; then
        kill "$boot" 2>/dev/null || true
        wait "$boot" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
fail() { cat "$log" >&2; echo "demo.sh: $1" >&2; exit 1; }

"$python" vm-images/build.py --profile "$profile" --scenario default --out "$out" >"$log" 2>&1 \
    || fail "building the guest failed"
"$python" vm-images/boot.py --scratch "$out" >>"$log" 2>&1 &
boot=$!
until grep -q '^gdb-socket ' "$log"; do                # boot.py prints it once the guest is up
    kill -0 "$boot" 2>/dev/null || fail "the guest did not come up"
    sleep 0.1
done
stub=$(awk '/^gdb-socket /{print $2}' "$log")          # a unix socket in boot.py's 0700 directory

# a command file: gdb stops at the first command that fails and exits 1
for command in "target remote $stub" "handle info" "handle ps" \
               "handle walk lsass.exe --type File" "handle lookup 4 0x4" "detach"; do
    printf 'echo (gdb) %s\\n\n%s\n' "$command" "$command"
done >"$work/session.gdb"
echo "\$ gdb -q -x gdbinit.py"
gdb -nx -q -batch -x gdbinit.py -x "$work/session.gdb" 2>&1
