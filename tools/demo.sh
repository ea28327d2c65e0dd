#!/usr/bin/env bash
# The main job on the default test guest: install, build the guest, boot it under QEMU, attach gdb
# with the extension, then `handle ps`, a walk and a lookup. PROFILE=7601|19041|22000|... picks the build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
profile=${PROFILE:-19041}
out=vm-images/out/default-$profile
.venv/bin/python vm-images/build.py --profile "$profile" --scenario default --out "$out"
log=$(mktemp)
.venv/bin/python vm-images/boot.py "$out" >"$log" 2>&1 &
boot=$!
trap 'kill $boot 2>/dev/null; wait $boot 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 300); do
    grep -q '^gdb-port ' "$log" && break
    kill -0 $boot 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1
done
port=$(awk '/^gdb-port /{print $2}' "$log")
[ -n "$port" ] || { cat "$log"; echo "the guest did not come up" >&2; exit 1; }
gdb -nx -q -batch -x gdbinit.py \
    -ex "target remote 127.0.0.1:$port" \
    -ex "handle info" \
    -ex "handle ps" \
    -ex "handle walk lsass.exe" \
    -ex "handle lookup 4 0x4" \
    -ex "detach"
