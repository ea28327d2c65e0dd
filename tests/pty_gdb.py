"""An interactive gdb on a pseudo-terminal, as a user has it: styling, the prompt, readline.

MI (mi.py) cannot show what a terminal shows (colours, where the prompt lands), so the few
tests about that drive gdb through a pty: send a line, wait for a pattern in what gdb
writes (an event, never a fixed sleep).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time

ANSI = re.compile(r"\x1b\[[0-9;]*m")               # colours (SGR)
READLINE = re.compile(r"\x1b\[\?2004[hl]")          # readline's bracketed-paste switches, not output


class PtyGdb:
    def __init__(self, *args: str, env: dict | None = None, columns: int = 200):
        master, slave = os.openpty()
        os.set_blocking(master, False)
        import fcntl
        import struct
        import termios
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
        self.master = master
        self.seen = ""                        # everything gdb wrote, as text
        self.mark = 0                         # expect() searches from here
        self.proc = subprocess.Popen(["gdb", "-nx", "-q", "-iex", "set pagination off", *args],
                                     stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     env={**os.environ, "TERM": "xterm-256color", **(env or {})})
        os.close(slave)

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.seen += os.read(self.master, 65536).decode("utf-8", "replace")
            except OSError:
                pass

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        """Wait until `pattern` (a regex) appears after the mark; move the mark past it."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.S)
        while True:
            found = regex.search(self.seen, self.mark)
            if found:
                self.mark = found.end()
                return found
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError(f"no {pattern!r} from gdb; it wrote: {self.seen[self.mark:][-2000:]!r}")
            self._read(0.1)

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def command(self, line: str, timeout: float = 120) -> str:
        """Run one command after the prompt; what it printed up to the next prompt."""
        self.send(line)
        self.expect(re.escape(line) + r"\r?\n", timeout)
        start = self.mark
        self.expect(r"\(gdb\) ", timeout)
        return READLINE.sub("", self.seen[start:self.mark - len("(gdb) ")])

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        os.close(self.master)

    def __enter__(self) -> "PtyGdb":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
