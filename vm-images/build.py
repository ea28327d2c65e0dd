#!/usr/bin/env python3
"""Build a test guest: python vm-images/build.py --profile BUILD --scenario NAME --out DIR."""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from winguest.corrupt import KINDS  # noqa: E402
from winguest.guest import SCENARIO_NAMES, build, write  # noqa: E402


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", required=True,
                    help="build number (first matching profile, e.g. 19041), full version (10.0.19041.867) "
                         "or PDB guid_age")
    ap.add_argument("--scenario", default="default", choices=SCENARIO_NAMES,
                    help="what the guest holds (default: default); see vm-images/README.md")
    ap.add_argument("--seed", type=int, default=0, help="varies addresses, names and handle values (default 0)")
    ap.add_argument("--guid", choices=["random"], help="a GUID no known kernel has")
    ap.add_argument("--corrupt", action="append", default=[], choices=sorted(KINDS), metavar="KIND",
                    help="damage the guest (repeatable): " + ", ".join(sorted(KINDS)))
    ap.add_argument("--code-variants", choices=["random"],
                    help="exported functions in equivalent encodings drawn per guest (seeded)")
    ap.add_argument("--out", required=True, type=Path, metavar="DIR",
                    help="directory to write loader.bin, memory.bin, guest.json, disk.qcow2, truth.json, ...")
    return ap


def main() -> int:
    a = parser().parse_args()
    t0 = time.monotonic()
    g = build(a.profile, a.scenario, a.seed, a.guid, a.corrupt, a.code_variants)
    write(a.out, g)
    t = g["truth"]
    print(f"{a.out}: {t['profile']['version']} {a.scenario} seed {a.seed}: {len(t['processes'])} processes, "
          f"{len(t['handles'])} handles{' intact' if a.corrupt else ''}, {len(g['memory.bin']) >> 20} MiB blob, {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
