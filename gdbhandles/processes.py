"""The engine's process list: read once with full image names, chosen by pid, image name or a
unique prefix of the name. What reading it met (a layout without full names, an unreadable
name) is kept as notes, said once."""

from __future__ import annotations

from dataclasses import replace

from gdbhandles.errors import HandleError, ProcessNotFound, ProfileError
from gdbhandles.records import WalkWarning
from gdbhandles.windows.cid_table import cid_table
from gdbhandles.windows.eprocess import Process, active_processes, image_path, read_process
from gdbhandles.windows.handle_table import Entry
from gdbhandles.windows.kernel import Kernel
from gdbhandles.windows.object_header import Headers

__all__ = ["ProcessList"]


class ProcessList:
    """The active processes of one kernel (one stop of the guest)."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.notes: list[WalkWarning] = []
        self._list: list[Process] | None = None
        self._by_eprocess: dict[int, Process] = {}

    def all(self) -> list[Process]:
        """Every process on PsActiveProcessHead's list, with full image names, read once. A
        damaged list is one note per bad link, and is completed from its other direction,
        PsInitialSystemProcess and PspCidTable (windows.eprocess.active_processes)."""
        if self._list is None:
            found, problems = active_processes(self.kernel)
            for process, message in problems:
                self._note(WalkWarning(process and process.pid, process and process.name, message))
            if problems:
                found += self._only_in_cid_table({p.eprocess for p in found})
            self._list = [self._with_path(p) for p in found]
            self._by_eprocess.update((p.eprocess, p) for p in self._list)
        return self._list

    def _only_in_cid_table(self, known: set[int]) -> list[Process]:
        """Processes PspCidTable holds that a damaged process list did not reach (each noted)."""
        found: list[Process] = []
        try:
            entries = [e for e in cid_table(self.kernel).entries() if isinstance(e, Entry) and e.header]
        except HandleError as exc:
            self._note(WalkWarning(None, None, f"PspCidTable unreadable ({exc}): processes off the list not sought"))
            return found
        headers = Headers(self.kernel)
        for entry in entries:
            body = entry.header           # PspCidTable entries hold the body itself
            try:
                if body in known or headers.at_body(body).type != "Process":
                    continue
                process = read_process(self.kernel, body)
            except HandleError:
                continue
            known.add(body)
            found.append(process)
            self._note(WalkWarning(process.pid, process.name, f"process {body:#x} is in PspCidTable but not "
                                                              "on the process list; added"))
        return found

    def at(self, eprocess: int) -> Process:
        """The process of the _EPROCESS at `eprocess`, also one no longer on the list (read on
        its own: naming one process does not read the whole list)."""
        process = self._by_eprocess.get(eprocess)
        if process is None:
            process = self._by_eprocess[eprocess] = self._with_path(read_process(self.kernel, eprocess))
        return process

    def select(self, target: int | str | None) -> list[Process]:
        """All (None), those with a pid, or those with an image name; ProcessNotFound if none."""
        processes = self.all()
        if target is None:
            return processes
        if isinstance(target, str):
            chosen = by_name(processes, target)
        else:
            chosen = [p for p in processes if p.pid == target]
        if not chosen:
            what = f"named {target}" if isinstance(target, str) else f"with pid {target} ({target:#x})"
            raise ProcessNotFound(f"no process {what}")
        return chosen

    def one(self, target: int | str) -> Process:
        """The one process `target` names; ProcessNotFound if it names several."""
        chosen = self.select(target)
        if len(chosen) > 1:
            pids = ", ".join(str(p.pid) for p in chosen)
            raise ProcessNotFound(f"{len(chosen)} processes are named {chosen[0].name} (pids {pids}): give a pid")
        return chosen[0]

    def _note(self, warning: WalkWarning) -> None:
        if all(str(w) != str(warning) for w in self.notes):
            self.notes.append(warning)

    def _with_path(self, process: Process) -> Process:
        """The process with its full image path, or as it is with a note saying why not."""
        try:
            path = image_path(self.kernel, process)
        except ProfileError as exc:
            self._note(WalkWarning(None, None, f"full image names unknown ({exc}); process names are "
                                               "the 15-byte ImageFileName"))
            return process
        except HandleError as exc:
            self._note(WalkWarning(process.pid, process.image_file_name,
                                   f"full image name unreadable ({exc}); showing ImageFileName"))
            return process
        return replace(process, image_path=path) if path else process


def by_name(processes: list[Process], text: str) -> list[Process]:
    """Processes named `text` (full or 15-byte name, any case), else those whose full name
    starts with it, when that prefix names one image only."""
    wanted = text.lower()
    exact = [p for p in processes if wanted in (p.name.lower(), p.image_file_name.lower())]
    if exact:
        return exact
    prefixed = [p for p in processes if p.name.lower().startswith(wanted)]
    names = sorted({p.name for p in prefixed})
    if len(names) > 1:
        shown = ", ".join(names[:6]) + (" …" if len(names) > 6 else "")
        raise ProcessNotFound(f"{text!r} starts {len(names)} image names ({shown}): give more of it or a pid")
    return prefixed
