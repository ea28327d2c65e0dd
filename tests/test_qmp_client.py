"""The QMP client against hostile peers (small fake servers: they are the hostile peers) and
against QEMU's real monitor while another client holds it: every step ends within its time
limit with one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from gdbhandles.automation.qmp import Qmp, QmpError
from qmp_peers import GREETING, PEERS, Peer, _lines

SHORT = 0.3          # seconds: the peers below never answer, so every case waits this long once

EXPECTED = {
    "silent": "no QMP greeting within 0.3 s: QEMU's monitor is busy with another client",
    "pure_echo": "no QMP greeting within 0.3 s",
    "greets_then_silent": "QMP qmp_capabilities: no answer within",
    "echoes": "is not a QMP server (it answered",
    "nonsense": "is not a QMP server (it sent 'SSH-2.0",
    "hangs_up": "closed the connection",
    "endless": "answer longer than 16 MiB",
    "wrong_shape": "is not a QMP server (it answered '[1, 2, 3]')",
}


def one_line(error: QmpError) -> str:
    text = str(error)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_peer_fails_in_one_line(tmp_path, name):
    with Peer(tmp_path / "qmp.sock", PEERS[name]):
        with pytest.raises(QmpError) as exc:
            Qmp(str(tmp_path / "qmp.sock"), timeout=SHORT, connect_timeout=30 if name == "endless" else SHORT)
    assert EXPECTED[name] in one_line(exc.value)


def test_peer_that_stops_answering_after_the_handshake(tmp_path):
    with Peer(tmp_path / "qmp.sock", PEERS["capabilities_only"]):
        with Qmp(str(tmp_path / "qmp.sock"), timeout=SHORT, connect_timeout=SHORT) as q:
            for call in (q.status, q.stop, q.cont, q.ram_size, lambda: q.pmemsave("/nonexistent", 4096),
                         lambda: q.snapshot_save("tag", "disk0")):
                with pytest.raises(QmpError) as exc:
                    call()
                assert "no answer within" in one_line(exc.value)


def test_socket_files_that_are_not_servers(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(QmpError, match="not a socket"):
        Qmp(str(plain))
    with pytest.raises(QmpError, match="no such file"):
        Qmp(str(tmp_path / "missing"))
    dead = socket.socket(socket.AF_UNIX)            # bound, never listening: what a dead QEMU leaves
    dead.bind(str(tmp_path / "dead.sock"))
    with pytest.raises(QmpError, match="nobody listens"):
        Qmp(str(tmp_path / "dead.sock"), connect_timeout=SHORT)
    dead.close()
    with pytest.raises(QmpError, match="tcp:127.0.0.1:PORT"):
        Qmp("tcp:10.1.2.3:4444")


def test_qemu_monitor_held_by_another_client_is_busy(tmp_path):
    """QEMU's real QMP socket: a second client is queued without a greeting, further ones refused."""
    path = str(tmp_path / "qmp.sock")
    qemu = subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-display", "none", "-nodefaults",
                             "-qmp", f"unix:{path},server=on,wait=off"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = _first_client(path, qemu)
        with first:
            messages = set()
            for _ in range(4):          # the first waits in the kernel's queue, the rest find it full
                with pytest.raises(QmpError) as exc:
                    Qmp(path, connect_timeout=SHORT)
                messages.add(one_line(exc.value))
            assert all("busy with another client" in m for m in messages), messages
            assert first.status() in ("running", "prelaunch")
        with Qmp(path) as again:               # the holder left: the monitor serves the next one
            again.execute("quit")
        assert qemu.wait(timeout=30) == 0
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()


def _first_client(path: str, qemu: subprocess.Popen) -> Qmp:
    """Connect once QEMU has created its socket (its start-up is the event we wait for)."""
    while True:
        assert qemu.poll() is None, "QEMU exited"
        if os.path.exists(path):
            try:
                return Qmp(path)
            except QmpError:
                pass
        os.sched_yield()


def _stale_events_then_monitor(connection):
    """What QEMU sends a client after one that left with events unsent: those events, then
    the greeting; then a monitor that answers query-status."""
    event = {"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}
    connection.sendall((json.dumps(event) + "\n").encode() * 3 + GREETING)
    for line in _lines(connection):
        request = json.loads(line)
        answer = {"running": True, "status": "running"} if request["execute"] == "query-status" else {}
        connection.sendall(json.dumps({"return": answer, "id": request.get("id")}).encode() + b"\n")


def test_events_left_by_an_earlier_client_come_before_the_greeting(tmp_path):
    with Peer(tmp_path / "qmp.sock", _stale_events_then_monitor):
        with Qmp(str(tmp_path / "qmp.sock"), timeout=5, connect_timeout=5) as q:
            assert q.status() == "running"
