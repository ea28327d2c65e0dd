"""What `gdbhandles --version` and `handle version` print: the version and where the shipped
layout data comes from."""

from __future__ import annotations

from gdbhandles import __version__
from gdbhandles.windows import layouts

__all__ = ["version_text"]


def version_text() -> str:
    profiles = layouts.shipped_profiles()
    from_isf = sum(1 for p in profiles if p["file"] == "offsets")
    return (f"gdbhandles {__version__}\n"
            f"layouts: {len(profiles)} shipped profiles ({from_isf} from JPCERTCC/Windows-Symbol-Tables "
            f"ISFs, BSD-3-Clause; {len(profiles) - from_isf} from vergilius-rs headers, Apache-2.0), "
            f"{layouts.known_kernels()} kernels known by PDB GUID; see {layouts.DATA / 'NOTICE.md'}")
