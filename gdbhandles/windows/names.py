"""An object's name, per type, where Windows keeps it.

File → its device's object path + `_FILE_OBJECT.FileName` (`\\Device\\HarddiskVolume3\\Windows`,
as ObQueryNameString and volatility3 give it); Key → the control block chain
(`\\REGISTRY\\MACHINE\\…`); Process → `image(pid)`; Thread → the thread id; anything else →
the name-info optional header. Each rule reads only its own structures, so a layout that
lacks a registry member leaves Key names unknown (ProfileError) and nothing else.
"""

from __future__ import annotations

import enum
from typing import Callable

from gdbhandles.errors import CorruptTable, DamagedChain, HandleError, ProfileError
from gdbhandles.windows import file_check
from gdbhandles.windows.ethread import EThread
from gdbhandles.windows.file_object import FileObject
from gdbhandles.windows.kernel import Kernel
from gdbhandles.windows.memory import PAGE
from gdbhandles.windows.object_header import MAX_DECODED, NAME_INFO_BIT, Header, Headers, ObjectHeaderNameInfo
from gdbhandles.windows.registry_key import key_path
from gdbhandles.windows.unicode_string import UnicodeString

__all__ = ["NameSource", "Names", "MAX_DIRECTORY_DEPTH"]

MAX_DIRECTORY_DEPTH = 16
REGISTRY_ROOT = "\\REGISTRY"    # the name of the root key control block on every build
# bytes before a header read with it: the name info (0x20 on x64) of an object without creator info,
# the usual case (creator info is kept for few types unless FLG_MAINTAIN_OBJECT_TYPELIST is set);
# with it, the name info lies 0x20 further back and is read when the name is. Any reach back risks
# the line before; on big, whose headers often sit 0x30 into a line, a 0x40 reach made the walk
# 3,222 reads instead of 2,746
NAME_REACH = 0x20
BODY_REACH = 0x80           # bytes of the body the per-type rules read (FILE_OBJECT.FileName …)


class NameSource(enum.Enum):
    """Where the name of an object of some type lives."""
    NAME_INFO = "_OBJECT_HEADER_NAME_INFO.Name"
    FILE = "device path + _FILE_OBJECT.FileName"
    KEY = "_CM_KEY_BODY → _CM_KEY_CONTROL_BLOCK chain"
    PROCESS = "image name(pid) of the _EPROCESS"
    THREAD = "_ETHREAD.Cid.UniqueThread"
    NONE = "no name"


BY_TYPE = {"File": NameSource.FILE, "Key": NameSource.KEY, "Process": NameSource.PROCESS,
           "Thread": NameSource.THREAD}


class Names:
    """Names of one kernel's objects; `process_label(eprocess)` names processes (`lsass.exe(672)`)."""

    def __init__(self, kernel: Kernel, headers: Headers, process_label: Callable[[int], str]):
        self.kernel = kernel
        self.headers = headers
        self.process_label = process_label
        self.paths: dict[int, str | HandleError] = {}
        self.key_paths: dict[int, str | None] = {}      # _CM_KEY_CONTROL_BLOCK -> its path
        self.decoded: dict[int, str | None] = {}
        self.name_info_struct = ObjectHeaderNameInfo.of(kernel.layout)
        self.files = FileObject.of(kernel.layout)
        self.threads = EThread.of(kernel.layout)
        self.strings = UnicodeString.of(kernel.layout)
        self.extents: dict[int, tuple[int, int] | None] = {}     # strings measured by prefetch

    def source(self, header: Header) -> NameSource:
        found = BY_TYPE.get(header.type)
        if found is not None:
            return found
        return NameSource.NAME_INFO if header.info_mask & NAME_INFO_BIT else NameSource.NONE

    @staticmethod
    def source_of(type_name: str) -> NameSource:
        """Where names of objects of type `type_name` come from, for those that have one."""
        return BY_TYPE.get(type_name, NameSource.NAME_INFO)

    def name(self, header: Header) -> str | None:
        """The object's name; HandleError if unreadable, ProfileError if the layout lacks a member."""
        found = self.decoded.get(header.header, self)
        if found is self:
            if len(self.decoded) >= MAX_DECODED:         # bounded like the line cache: start afresh
                self.decoded.clear()
            found = self.decoded[header.header] = self._decode(header)
        return found

    def _decode(self, header: Header) -> str | None:
        source = self.source(header)
        space, body = self.kernel.space, header.body
        if source is NameSource.NAME_INFO:
            return self._text(self.name_info_struct.name_address(self.headers.name_info(header)))
        if source is NameSource.FILE:
            return self.file_name(body)
        if source is NameSource.KEY:
            return self.key_name(body)
        if source is NameSource.PROCESS:
            return self.process_label(body)
        if source is NameSource.THREAD:
            return str(self.threads.thread_id(space, body))
        return None

    def key_name(self, body: int) -> str:
        """\\REGISTRY\\…: every key's control blocks chain up to the root named REGISTRY; a
        chain that ends elsewhere is read through a wrong layout or damaged (CorruptTable)."""
        if len(self.key_paths) >= MAX_DECODED:          # bounded like the line cache: start afresh
            self.key_paths.clear()
        path = key_path(self.kernel.space, self.kernel.layout, body, self.key_paths)
        if path is None or not (path.upper() + "\\").startswith(REGISTRY_ROOT + "\\"):
            raise CorruptTable(f"key {body:#x}: its control blocks do not chain up to the root \\REGISTRY")
        return path

    def file_name(self, body: int) -> str | None:
        """Device path + FileName; the device part is left out when the device has no name.
        ProfileError when the _FILE_OBJECT layout failed its check on live File objects."""
        failed = file_check.failure(self.kernel, self.headers)
        if failed:
            raise ProfileError(failed)
        files = self.files
        device = files.device(self.kernel.space, body)
        prefix = self.object_path(device) if device else ""
        return (prefix + (self._text(files.file_name_address(body)) or "")) or None

    def _text(self, address: int) -> str | None:
        """The _UNICODE_STRING at `address`, measured once (by prefetch, when it ran)."""
        extent = self.extents.pop(address, self)
        if extent is self:
            extent = self.strings.extent(self.kernel.space, address)
        return self.strings.text(self.kernel.space, extent)

    def object_path(self, body: int) -> str:
        """A named object's full path (`\\Device\\HarddiskVolume3`): its name-info names up the
        Directory chain to the root directory (the one without a parent); '' when unnamed."""
        if body not in self.paths:
            if len(self.paths) >= MAX_DECODED:          # bounded like the line cache: start afresh
                self.paths.clear()
            try:
                self.paths[body] = self._object_path(body)
            except HandleError as exc:
                self.paths[body] = exc
        found = self.paths[body]
        if isinstance(found, HandleError):
            raise found
        return found

    def _object_path(self, body: int) -> str:
        """The path, up to the first directory whose path is known; each level's characters come
        in one read with the next directory's header, and every directory's path is kept."""
        info_struct = self.name_info_struct
        chain, current, seen, prefix = [], body, set(), ""
        while current:
            known = self.paths.get(current) if current != body else None
            if isinstance(known, str):
                prefix = known
                break
            if current in seen:
                raise DamagedChain(f"object directory {current:#x} is its own ancestor (the Directory chain loops)")
            if len(seen) > MAX_DIRECTORY_DEPTH:
                raise DamagedChain(f"object {body:#x} is more than {MAX_DIRECTORY_DEPTH} directories deep")
            seen.add(current)
            info = self.headers.name_info(self.headers.at_body(current))
            if info is None:                  # unnamed: the path ends here
                break
            parent = info_struct.directory(self.kernel, info)
            if parent:
                self._gather(info_struct.name_address(info), parent)
                chain.append((current, info_struct.name(self.kernel, info) or ""))
            current = parent
        for directory, name in reversed(chain):
            prefix += "\\" + name
            if directory != body:
                self.paths[directory] = prefix
        return prefix

    def _gather(self, string: int, body: int) -> None:
        """The characters of the _UNICODE_STRING at `string` and the header neighbourhood of the
        object at `body` (unless its path is known) in one read: the next step up a chain."""
        space = self.kernel.space
        ranges = self.strings.buffers(space, [string])
        if body not in self.paths:
            header = body - self.headers.struct.body_offset()
            ranges.append((header - NAME_REACH, NAME_REACH + self.headers.struct.body_offset()))
        space.prefetch(ranges)

    def prefetch_objects(self, headers: list[int]) -> None:
        """Bring what names are read from around many object headers (optional headers, the
        header itself, the body fields) into the cache in few reads."""
        reach = NAME_REACH + self.headers.struct.body_offset() + BODY_REACH
        self.kernel.space.prefetch([(header - NAME_REACH, reach) for header in headers])

    def prefetch_one(self, header: int) -> None:
        """For one lookup, in as few reads as the object has pages: the header's neighbourhood on
        the header's own page first (its type), then what its name rule reads there (name info,
        the body's first fields, or a thread's Cid far into the body), then the name's characters."""
        space, page = self.kernel.space, header & ~(PAGE - 1)
        start, end = header - NAME_REACH, header + self.headers.struct.body_offset() + BODY_REACH
        space.prefetch([(max(start, page), min(end, page + PAGE) - max(start, page))])
        try:
            found = self.headers.read(header)
        except HandleError:
            return                     # the lookup says so
        source = self.source(found)
        if source is NameSource.NAME_INFO:
            info = self.headers.name_info(found)
            space.prefetch([(info, header - info)])
        elif source is NameSource.THREAD:
            space.prefetch([(self.threads.thread_id_address(found.body), 8)])
        elif source is not NameSource.NONE:
            space.prefetch([(found.body, BODY_REACH)])
        if source is NameSource.FILE:        # FileName's characters with the device's header
            try:
                device = self.files.device(space, found.body)
            except HandleError:
                device = 0
            if device:
                self._gather(self.files.file_name_address(found.body), device)
                return
        self.prefetch([found], objects=False)

    def prefetch(self, headers: list[Header], objects: bool = True) -> None:
        """Bring the name-info headers and body fields (unless `objects` is False: already
        there), then the strings they point to, into the cache in few reads, for objects whose
        names will be decoded next."""
        space = self.kernel.space
        if objects:
            self.prefetch_objects([h.header for h in headers])
        strings, decoded = [], self.decoded
        if len(self.extents) >= MAX_DECODED:          # those of names that failed before their text
            self.extents.clear()
        for header in headers:
            if header.header in decoded:              # named before (another handle to it)
                continue
            source = self.source(header)
            try:
                if source is NameSource.NAME_INFO:
                    strings.append(self.name_info_struct.name_address(self.headers.name_info(header)))
                elif source is NameSource.FILE:
                    strings.append(self.files.file_name_address(header.body))
            except HandleError:       # ProfileError included: the name decode will report it
                continue
        space.prefetch(self.strings.buffers(space, strings, self.extents))
