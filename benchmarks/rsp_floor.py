"""The raw-stub floor: what any client of QEMU's gdbstub pays, measured with a plain RSP client.

No gdb, no cache, no decoding: TCP_NODELAY, physical mode, `m` packets of 2 KiB (QEMU's 4 KiB
packet limit, hex-encoded). `floor(bytes, reads)` = the time to read `bytes` in 2 KiB packets
plus `reads` single round trips, the least a walk needing that many reads could cost.
"""

from __future__ import annotations

import socket
import statistics
import time

CHUNK = 0x800
START = 0x1000000             # 16 MiB: guest RAM in every test guest


class Rsp:
    """A minimal RSP client with acknowledgements (QEMU 7.2 offers no no-ack mode)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("gdbstub closed the connection")
        self.buf += chunk

    def packet(self, body: str) -> str:
        raw = body.encode()
        self.sock.sendall(b"$" + raw + b"#%02x" % (sum(raw) & 0xFF))
        return self.reply()

    def reply(self) -> str:
        while (start := self.buf.find(b"$")) < 0:     # skip '+' acks
            self.buf = b""
            self._fill()
        while (end := self.buf.find(b"#", start)) < 0 or len(self.buf) < end + 3:
            self._fill()
        reply, self.buf = self.buf[start + 1:end], self.buf[end + 3:]
        self.sock.sendall(b"+")
        return reply.decode()

    def close(self) -> None:
        self.sock.close()


def measure(port: int, total: int, trips: int = 300) -> dict:
    """Seconds to read `total` bytes in 2 KiB packets, and the median single round trip."""
    rsp = Rsp(port)
    try:
        rsp.packet("?")                            # QEMU stops the VM for its client
        reply = rsp.packet("qqemu.sstepbits")     # known answer: skips the extra stop reply
        while not reply.startswith("ENABLE="):    # QEMU may send after connecting
            reply = rsp.reply()
        assert rsp.packet("Qqemu.PhyMemMode:1") == "OK"
        started = time.perf_counter()
        for offset in range(0, total, CHUNK):
            reply = rsp.packet(f"m{START + offset:x},{min(CHUNK, total - offset):x}")
            assert len(reply) == 2 * min(CHUNK, total - offset), reply[:40]
        bulk = time.perf_counter() - started
        samples = []
        for _ in range(trips):
            started = time.perf_counter()
            rsp.packet(f"m{START:x},8")
            samples.append(time.perf_counter() - started)
        rsp.packet("Qqemu.PhyMemMode:0")
        rsp.sock.sendall(b"$D#44")                 # detach: QEMU resumes the VM
    finally:
        rsp.close()
    return {"bytes": total, "bulk_s": bulk, "round_trip_s": statistics.median(samples)}


def floor(measured: dict, reads: int) -> float:
    return measured["bulk_s"] + reads * measured["round_trip_s"]
