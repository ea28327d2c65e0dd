"""Hostile QMP peers for the tests: small unix-socket servers that misbehave in one way each.

Each peer runs in a thread and sets `connected` when a client is in, so tests wait on that
event instead of sleeping.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

GREETING = b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}\n'


def _lines(connection: socket.socket):
    buffer = b""
    while True:
        chunk = connection.recv(4096)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line


def silent(connection):
    """Accepts and says nothing (also what QEMU does to a second client)."""
    for _ in _lines(connection):
        pass


def greets_then_silent(connection):
    connection.sendall(GREETING)
    for _ in _lines(connection):
        pass


def echoes(connection):
    """Greets, then sends every request back."""
    connection.sendall(GREETING)
    for line in _lines(connection):
        connection.sendall(line + b"\n")


def pure_echo(connection):
    for line in _lines(connection):
        connection.sendall(line + b"\n")


def nonsense(connection):
    connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    for _ in _lines(connection):
        pass


def hangs_up(connection):
    connection.close()


def endless(connection):
    """Greets, then streams one line that never ends."""
    connection.sendall(GREETING)
    next(_lines(connection), None)
    block = b"x" * 65536
    try:
        while True:
            connection.sendall(block)
    except OSError:
        pass


def capabilities_only(connection):
    """A QMP server that accepts the capabilities, then never answers a command."""
    connection.sendall(GREETING)
    for line in _lines(connection):
        request = json.loads(line)
        if request["execute"] == "qmp_capabilities":
            connection.sendall(json.dumps({"return": {}, "id": request.get("id")}).encode() + b"\n")


def wrong_shape(connection):
    connection.sendall(GREETING)
    for _ in _lines(connection):
        connection.sendall(b"[1, 2, 3]\n")


PEERS = {"silent": silent, "greets_then_silent": greets_then_silent, "echoes": echoes,
         "pure_echo": pure_echo, "nonsense": nonsense, "hangs_up": hangs_up, "endless": endless,
         "capabilities_only": capabilities_only, "wrong_shape": wrong_shape}


class Peer:
    """A hostile QMP peer on a unix socket (a context manager); one client at a time."""

    def __init__(self, path: Path, behaviour):
        self.path = str(path)
        self.behaviour = behaviour
        self.connected = threading.Event()
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(self.path)
        self.server.listen(4)
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(connection)
            self.connected.set()
            try:
                self.behaviour(connection)
            except OSError:
                pass
            finally:
                connection.close()

    def __enter__(self) -> "Peer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for connection in [self.server, *self.connections]:   # wakes the blocked accept/recv
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server.close()
        self.thread.join(timeout=10)
