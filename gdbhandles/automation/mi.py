"""A small token-based driver for gdb's machine interface (pygdbmi underneath).

Used by the live tests and by `gdbhandles run`. pygdbmi's own `write()` waits for
0.2 s of silence after every command; here each command carries a numeric token and
we read until *its* result record arrives, with `time_to_check_for_additional_output_sec`
set to 0 after construction (passing 0 to the constructor would make every read wait
for the full timeout). Async records (`*stopped`, `=thread-created`, …) that arrive
between commands are kept in a backlog so a later wait cannot match a stale one.
One read can return several records: those after the result record we waited for (on a
loaded machine, `^done` of -exec-interrupt together with the `*stopped` that follows it)
stay unread for the next reader instead of being lost.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

from pygdbmi.gdbcontroller import GdbController

DEFAULT_TIMEOUT = 30.0
POLL = 0.05


class MiError(Exception):
    """gdb answered `^error`; the message is gdb's one line (the `log` text is kept)."""

    def __init__(self, message: str, log: str = "", console: str = ""):
        lines = [line for line in log.splitlines() if line.strip()]
        detail = lines[-2] if len(lines) > 1 and lines[-1].strip() == message.strip() else ""
        super().__init__(f"{message} ({detail.strip()})" if detail else message)
        self.message = message
        self.log = log
        self.console = console


class MiTimeout(MiError):
    """No answer within the timeout: gdb hangs or the target does."""


@dataclass
class MiResult:
    message: str                       # "done", "connected", "running", "exit"
    payload: dict | None
    console: str                       # the CLI's stdout while the command ran
    log: str                           # gdb's stderr and warnings while it ran
    records: list[dict] = field(default_factory=list)


def quote(text: str) -> str:
    """An MI c-string: what `-interpreter-exec console` takes."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class Gdb:
    """One gdb process in MI mode; all-stop, `mi-async on` (so we can interrupt a running target)."""

    def __init__(self, gdb: str = "gdb", args: tuple[str, ...] = (), timeout: float = DEFAULT_TIMEOUT):
        path = shutil.which(gdb)
        if path is None:
            raise MiError(f"gdb not found: {gdb} (apt-get install gdb)")
        self.timeout = timeout
        self.backlog: list[dict] = []
        self._unread: list[dict] = []
        self._token = 0
        self._ctrl = GdbController(command=[path, "--nx", "--quiet", "--interpreter=mi3", *args])
        self._ctrl.io_manager.time_to_check_for_additional_output_sec = 0
        try:
            for setting in ("mi-async on", "pagination off", "confirm off", "width 0", "height 0"):
                self.mi(f"-gdb-set {setting}")
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int | None:
        proc = self._ctrl.gdb_process
        return proc.pid if proc else None

    def _read(self, timeout: float) -> list[dict]:
        if self._unread:
            records, self._unread = self._unread, []
            return records
        if self._ctrl.gdb_process is None:
            raise MiError("gdb is not running")
        records = self._ctrl.get_gdb_response(timeout_sec=timeout, raise_error_on_timeout=False)
        if not records and self._ctrl.gdb_process.poll() is not None:
            raise MiError(f"gdb exited with status {self._ctrl.gdb_process.returncode}")
        return records

    def send(self, command: str) -> int:
        """Write one MI command without waiting; its token, for result(). Records read before it
        was sent are not its output: async ones go to the backlog, stray console text is dropped."""
        self.backlog.extend(r for r in self._unread if r.get("type") in ("notify", "exec", "status"))
        self._unread = []
        self._token += 1
        try:
            self._ctrl.write(f"{self._token}{command}", read_response=False)
        except (BrokenPipeError, ValueError):     # gdb died (or its pipe closed): as when a read finds it gone
            proc = self._ctrl.gdb_process
            raise MiError(f"gdb exited with status {proc.poll() if proc else None}") from None
        return self._token

    def result(self, token: int, timeout: float | None = None, what: str = "") -> MiResult:
        """Wait for the result record of `token`; `^error` raises MiError."""
        deadline = time.monotonic() + (timeout or self.timeout)
        console: list[str] = []
        log: list[str] = []
        mine: list[dict] = []
        while True:
            records = self._read(POLL)
            for i, rec in enumerate(records):
                kind = rec.get("type")
                if kind == "result" and rec.get("token") == token:
                    self._unread = records[i + 1:]
                    text, errtext = "".join(console), "".join(log)
                    payload = rec.get("payload")
                    if rec.get("message") == "error":
                        msg = (payload or {}).get("msg", "error") if isinstance(payload, dict) else str(payload)
                        raise MiError(msg, errtext, text)
                    return MiResult(rec.get("message"), payload, text, errtext, mine)
                if kind == "console":
                    console.append(rec.get("payload") or "")
                elif kind in ("log", "output") or rec.get("stream") == "stderr":
                    log.append(rec.get("payload") or "")
                elif kind in ("notify", "exec", "status"):
                    self.backlog.append(rec)
                mine.append(rec)
            if time.monotonic() > deadline:
                raise MiTimeout(f"gdb did not answer {what or token!r} within {timeout or self.timeout:g} s",
                                "".join(log), "".join(console))

    def mi(self, command: str, timeout: float | None = None) -> MiResult:
        """Send one MI command and wait for its result record; `^error` raises MiError."""
        return self.result(self.send(command), timeout, command)

    def ctrl_c(self) -> None:
        """SIGINT to gdb itself, as Ctrl-C in a terminal: a running `handle walk` stops with "Quit"."""
        if self._ctrl.gdb_process is not None:
            self._ctrl.gdb_process.send_signal(signal.SIGINT)

    def console(self, command: str, timeout: float | None = None) -> str:
        """Run a CLI command (`handle walk all --json`) and return what it printed."""
        return self.mi(f"-interpreter-exec console {quote(command)}", timeout).console

    def console_result(self, command: str, timeout: float | None = None) -> MiResult:
        """Like console() but keeps the log text (progress, warnings) too."""
        return self.mi(f"-interpreter-exec console {quote(command)}", timeout)

    def json(self, command: str, timeout: float | None = None):
        """Run a `--json` command and parse its output (the whole console text must be JSON)."""
        text = self.console(command, timeout)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise MiError(f"{command!r} printed no JSON: {text[:200]!r}") from exc

    def source(self, path: str) -> MiResult:
        return self.console_result(f"source {path}")

    def wait_async(self, message: str, timeout: float | None = None) -> dict:
        """Wait for an async record (`*stopped`, `=thread-created`), consuming the backlog first.

        pygdbmi gives `*` exec records and `=` notifications the same type, so match on
        the message alone."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, rec in enumerate(self.backlog):
                if rec.get("message") == message:
                    del self.backlog[: i + 1]
                    return rec
            if time.monotonic() > deadline:
                raise MiTimeout(f"no *{message} from gdb within {timeout or self.timeout:g} s")
            for rec in self._read(POLL):
                if rec.get("type") in ("notify", "exec", "status"):
                    self.backlog.append(rec)

    def drain(self) -> None:
        """Forget async records seen so far (after connect, after a stop we waited for)."""
        self._unread.clear()
        self._read(0)
        self.backlog.clear()

    def connect(self, host: str, port: int | None = None, timeout: float | None = None) -> None:
        """`target remote HOST:PORT`, or `target remote PATH` of a unix socket (port None);
        returns once the initial stop has been reported."""
        self.mi("-gdb-set architecture i386:x86-64")
        self.mi(f"-target-select remote {host if port is None else f'{host}:{port}'}", timeout)
        self.wait_async("stopped", timeout)
        self.drain()

    def cont(self) -> None:
        """Resume the target; returns at once (`^running`)."""
        self.drain()
        self.mi("-exec-continue")

    def interrupt(self, timeout: float | None = None) -> dict:
        """Stop a running target and wait for the stop."""
        self.drain()
        self.mi("-exec-interrupt")
        return self.wait_async("stopped", timeout)

    def close(self) -> None:
        """Detach and quit; kills gdb if it does not go within a few seconds."""
        proc = self._ctrl.gdb_process
        if proc is None:
            return
        try:
            if proc.poll() is None:
                self._ctrl.write("-gdb-exit", read_response=False)
                proc.wait(timeout=5)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def kill(self) -> None:
        proc = self._ctrl.gdb_process
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream:
                stream.close()
        self._ctrl.gdb_process = None

    def __enter__(self) -> "Gdb":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
