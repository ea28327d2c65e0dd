"""Reads, bytes, round trips and time of a full walk of the `big` test guest.

Runs the engine on the guest's memory.raw through a backend that counts what QEMU's
gdbstub would be asked for, and prices each read with the measured stub cost
(~0.06 ms per round trip + ~0.23 ms per 2 KiB, notes/qemu-gdbstub-qmp-facts.md).
With --lines it repeats the walk for several cache line sizes, the figure the
line size of memory.py was chosen by. It then compares the bytes of a full walk with
those of `--type Process` (filters before names), read from the dump (no round-trip
cost) and as gdbstub reads (where a round trip is worth ~512 bytes).

    .venv/bin/python benchmarks/walk_big.py [--profile 19041] [--scenario big] [--lines]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "vm-images"))

from gdbhandles.windows import memory  # noqa: E402
from gdbhandles.engine import Windows  # noqa: E402
from gdbhandles.windows.memory import DumpFile  # noqa: E402

TRIP_MS, PER_2K_MS = 0.06, 0.23


class StubPriced:
    """A DumpFile whose reads are also priced as gdbstub round trips."""

    round_trip_bytes = 512

    def __init__(self, dump: DumpFile):
        self.dump = dump
        self.size = dump.size
        self.milliseconds = 0.0

    def read(self, paddr: int, size: int) -> bytes:
        self.milliseconds += TRIP_MS + PER_2K_MS * size / 2048
        return self.dump.read(paddr, size)


def measure(path: Path) -> dict:
    backend = StubPriced(DumpFile(path))
    started = time.perf_counter()
    windows = Windows.open(backend)
    opened = backend.milliseconds
    count = sum(1 for _ in windows.walk())
    processes = len(windows.processes())
    stats = windows.info().stats
    return {"processes": processes, "handles": count, "requests": stats.reads, "round_trips": stats.round_trips,
            "bytes": stats.bytes, "cache_hits": stats.cache_hits, "cpu_s": time.perf_counter() - started,
            "stub_ms": backend.milliseconds, "discovery_stub_ms": opened}


def walk_bytes(backend, **filters) -> tuple[int, int, int]:
    """(handles, bytes, round trips) of one walk alone, on a fresh engine (after ps)."""
    windows = Windows.open(backend)
    windows.processes()
    stats = windows.kernel.phys.stats
    bytes_before, trips_before = stats.bytes, stats.round_trips
    count = sum(1 for _ in windows.walk(**filters))
    return count, stats.bytes - bytes_before, stats.round_trips - trips_before


def compare_filtered(path: Path) -> None:
    for label, make in (("dump", lambda: DumpFile(path)), ("gdbstub-priced", lambda: StubPriced(DumpFile(path)))):
        full = walk_bytes(make())
        only = walk_bytes(make(), type="Process")
        print(f"  {label}: full walk {full[0]} handles, {full[1]} bytes, {full[2]} round trips; "
              f"--type Process {only[0]} handles, {only[1]} bytes ({only[1] / full[1]:.0%}), {only[2]} round trips")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="19041")
    parser.add_argument("--scenario", default="big")
    parser.add_argument("--guest", type=Path, help="a built guest directory instead of the cached build")
    parser.add_argument("--lines", action="store_true", help="compare cache line sizes")
    args = parser.parse_args()
    if args.guest:
        path = args.guest / "memory.raw"
    else:
        from winguest.cache import guest
        path = guest(args.profile, args.scenario) / "memory.raw"
    for line in ((256, 512, 1024, 4096) if args.lines else (memory.LINE,)):
        memory.LINE = line
        m = measure(path)
        print(f"{args.profile}/{args.scenario} line {line:5d}: {m['processes']} processes, {m['handles']} handles "
              f"(walk + ps); {m['requests']} read requests, {m['round_trips']} round trips, "
              f"{m['bytes'] / 2**20:.1f} MiB, {m['cache_hits']} cache hits; offline {m['cpu_s']:.2f} s; "
              f"priced as gdbstub reads {m['stub_ms'] / 1000:.2f} s (discovery {m['discovery_stub_ms']:.0f} ms)")
        # the same requests sent one by one, as a reader without batching and cache would
        naive_ms = m["requests"] * TRIP_MS + PER_2K_MS * m["requests"] * 8 / 2048
        print(f"  one round trip per request instead: {naive_ms / 1000:.1f} s priced, "
              f"{naive_ms / m['stub_ms']:.1f}x the batched, cached walk; {m['requests'] / m['round_trips']:.0f}x "
              f"the round trips")
    compare_filtered(path)


if __name__ == "__main__":
    main()
