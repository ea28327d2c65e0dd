"""Fixtures every test uses: built test guests (cached) and booted ones (QEMU, cleaned up)."""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

VM_IMAGES = Path(__file__).resolve().parents[1] / "vm-images"
sys.path.insert(0, str(VM_IMAGES))

from boot import booted  # noqa: E402
from winguest.cache import guest as cached_guest  # noqa: E402


@dataclass
class BootedGuest:
    dir: Path
    truth: dict
    port: int
    gdb: str             # what gdb's `target remote` takes: a unix socket path (the default) or 127.0.0.1:PORT
    qmp: str
    pid: int


@pytest.fixture(scope="session")
def built_guest():
    """built_guest(profile=19041, scenario="default", seed=0, guid=None, corrupt=(), code_variants=None)
    -> guest directory."""
    def get(profile="19041", scenario="default", seed=0, guid=None, corrupt=(), code_variants=None) -> Path:
        return cached_guest(str(profile), scenario, seed, guid, tuple(corrupt), code_variants)
    return get


@pytest.fixture(scope="session")
def guest_truth(built_guest):
    """guest_truth(profile, **built_guest's keywords) -> (guest directory, its truth.json)."""
    def get(profile, **kw):
        directory = built_guest(profile, **kw)
        return directory, json.loads((directory / "truth.json").read_text())
    return get


@pytest.fixture
def booted_guest():
    """booted_guest(profile, scenario, seed, guid, **booted_kwargs) -> BootedGuest; QEMU is
    killed and its socket directory removed when the test ends."""
    with contextlib.ExitStack() as stack:
        def boot(profile="19041", scenario="default", seed=0, guid=None, code_variants=None, **kw) -> BootedGuest:
            d = cached_guest(str(profile), scenario, seed, guid, code_variants=code_variants)
            b = stack.enter_context(booted(d, **kw))
            return BootedGuest(d, json.loads((d / "truth.json").read_text()), b.port, b.gdb, b.qmp, b.pid)
        yield boot
