"""_OBJECT_HEADER decoding: the object's type (cookie-encoded TypeIndex) and its name.

Names follow where Windows keeps them: File → its device's path and FILE_OBJECT.FileName
(`\\Device\\HarddiskVolume3\\Windows\\…`, as ObQueryNameString and volatility3 give it), Key → the control
block chain, Process → `image(pid)`, Thread → the thread id, anything else → the name-info
optional header. Decoding is batched: headers, then the strings they point to, are
prefetched in few reads before being decoded from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from gdbhandles.errors import HandleError
from gdbhandles.windows.kernel import Kernel

NAME_INFO_BIT = 0x02
MAX_NAME = 0x1000            # bytes: longer strings are taken as corrupt and cut
MAX_KEY_DEPTH = 64
MAX_DIRECTORY_DEPTH = 16
HEADER_REACH = (0x40, 0xB0)  # bytes before/after a header read at once (name info … body fields)


@dataclass
class ObjectInfo:
    header: int
    body: int
    type: str | None
    name: str | None


class Objects:
    """Decodes object headers of one kernel; types and decoded objects are cached."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.space = kernel.space
        layout = kernel.layout
        self.body_offset = layout.offset("_OBJECT_HEADER", "Body")
        self.header_size = layout.size("_OBJECT_HEADER") or self.body_offset
        self.type_index = layout.field("_OBJECT_HEADER", "TypeIndex")
        self.info_mask = layout.field("_OBJECT_HEADER", "InfoMask")
        self.name_info_name = layout.offset("_OBJECT_HEADER_NAME_INFO", "Name")
        self.name_info_directory = layout.offset("_OBJECT_HEADER_NAME_INFO", "Directory")
        self.file_device = layout.offset("_FILE_OBJECT", "DeviceObject")
        self.ustr_length = layout.field("_UNICODE_STRING", "Length")
        self.ustr_buffer = layout.field("_UNICODE_STRING", "Buffer")
        self.type_name = layout.offset("_OBJECT_TYPE", "Name")
        self.file_name_offset = layout.offset("_FILE_OBJECT", "FileName")
        self.key_kcb = layout.offset("_CM_KEY_BODY", "KeyControlBlock")
        self.kcb_name_block = layout.offset("_CM_KEY_CONTROL_BLOCK", "NameBlock")
        self.kcb_parent = layout.offset("_CM_KEY_CONTROL_BLOCK", "ParentKcb")
        self.ncb_compressed = layout.field("_CM_NAME_CONTROL_BLOCK", "Compressed")
        self.ncb_length = layout.field("_CM_NAME_CONTROL_BLOCK", "NameLength")
        self.ncb_name = layout.offset("_CM_NAME_CONTROL_BLOCK", "Name")
        self.thread_cid = layout.offset("_ETHREAD", "Cid") + layout.offset("_CLIENT_ID", "UniqueThread")
        self.image_name = layout.offset("_EPROCESS", "ImageFileName")
        self.process_id = layout.field("_EPROCESS", "UniqueProcessId")
        self.type_table = kernel.globals["ObTypeIndexTable"]
        self.types: dict[int, str | None] = {}
        self.paths: dict[int, str] = {}
        self.decoded: dict[int, ObjectInfo] = {}

    # --- types ---------------------------------------------------------------------------

    def real_type_index(self, header: int, stored: int) -> int:
        """TypeIndex as stored, decoded with ObHeaderCookie on builds that have one."""
        cookie = self.kernel.header_cookie
        if cookie is None:
            return stored
        return stored ^ cookie ^ ((header >> 8) & 0xFF)

    def type_of_index(self, index: int) -> str | None:
        if index not in self.types:
            try:
                type_object = self.space.u64(self.type_table + 8 * index)
                self.types[index] = self.unicode_string(type_object + self.type_name) if type_object else None
            except HandleError:
                self.types[index] = None
        return self.types[index]

    # --- strings ---------------------------------------------------------------------------

    def unicode_string(self, address: int) -> str | None:
        """A UNICODE_STRING's text; None when empty."""
        raw = self.space.read(address, 16)
        length = self.ustr_length.extract(raw)
        buffer = self.ustr_buffer.extract(raw)
        if not length or not buffer:
            return None
        data = self.space.read(buffer, min(length, MAX_NAME) & ~1)
        return data.decode("utf-16-le", "replace")

    def _string_buffers(self, addresses: list[int]) -> list[tuple[int, int]]:
        ranges = []
        for address in addresses:
            try:
                raw = self.space.read(address, 16)
            except HandleError:
                continue
            length, buffer = self.ustr_length.extract(raw), self.ustr_buffer.extract(raw)
            if length and buffer:
                ranges.append((buffer, min(length, MAX_NAME)))
        return ranges

    def process_name(self, eprocess: int) -> str:
        raw = self.space.read(eprocess + self.image_name, 15)
        return raw.split(b"\0", 1)[0].decode("latin-1")

    def key_path(self, body: int) -> str | None:
        """\\REGISTRY\\… from the key body's control block up through ParentKcb."""
        kcb = self.space.u64(body + self.key_kcb)
        parts = []
        while kcb and len(parts) < MAX_KEY_DEPTH:
            name_block = self.space.u64(kcb + self.kcb_name_block)
            if name_block:
                head = self.space.read(name_block, self.ncb_name)
                length = min(self.ncb_length.extract(head), MAX_NAME)
                raw = self.space.read(name_block + self.ncb_name, length)
                compressed = self.ncb_compressed.extract(head)
                parts.append(raw.decode("latin-1") if compressed else raw.decode("utf-16-le", "replace"))
            kcb = self.space.u64(kcb + self.kcb_parent)
        return "\\" + "\\".join(reversed(parts)) if parts else None

    def object_path(self, body: int) -> str:
        """A named object's full path (`\\Device\\HarddiskVolume3`): its name-info names up the
        Directory chain to the root directory (the one without a parent); '' when unnamed."""
        if body not in self.paths:
            parts, current = [], body
            while current and len(parts) < MAX_DIRECTORY_DEPTH:
                header = current - self.body_offset
                mask = self.info_mask.extract(self.space.read(header, self.header_size))
                if not mask & NAME_INFO_BIT:          # unnamed: the path ends here
                    break
                info = header - self.kernel.info_mask_to_offset[mask & (NAME_INFO_BIT | (NAME_INFO_BIT - 1))]
                current = self.space.u64(info + self.name_info_directory)
                if current:
                    parts.append(self.unicode_string(info + self.name_info_name) or "")
            self.paths[body] = "\\" + "\\".join(reversed(parts)) if parts else ""
        return self.paths[body]

    def file_name(self, body: int) -> str | None:
        """Device path + FileName; the device part is left out when the device has no name."""
        device = self.space.u64(body + self.file_device)
        try:
            prefix = self.object_path(device) if device else ""
        except HandleError:
            prefix = ""
        return (prefix + (self.unicode_string(body + self.file_name_offset) or "")) or None

    # --- objects ---------------------------------------------------------------------------

    def _name_source(self, header: int, raw: bytes, type_name: str | None) -> tuple[str, int] | None:
        """Where the name lives: ("ustr", UNICODE_STRING address) or a per-type rule."""
        body = header + self.body_offset
        if type_name in ("File", "Key", "Process", "Thread"):
            return type_name, body
        mask = self.info_mask.extract(raw)
        if mask & NAME_INFO_BIT:
            offset = self.kernel.info_mask_to_offset[mask & (NAME_INFO_BIT | (NAME_INFO_BIT - 1))]
            return "ustr", header - offset + self.name_info_name
        return None

    def _header(self, header: int) -> tuple[str | None, tuple[str, int] | None]:
        raw = self.space.read(header, self.header_size)
        stored = self.type_index.extract(raw)
        type_name = self.type_of_index(self.real_type_index(header, stored))
        return type_name, self._name_source(header, raw, type_name)

    def _name(self, source: tuple[str, int] | None) -> str | None:
        if source is None:
            return None
        kind, address = source
        if kind == "ustr":
            return self.unicode_string(address)
        if kind == "File":
            return self.file_name(address)
        if kind == "Key":
            return self.key_path(address)
        if kind == "Process":
            pid = self.process_id.read(self.space.read, address)
            return f"{self.process_name(address)}({pid})"
        return str(self.space.u64(address + self.thread_cid))

    def decode(self, header: int) -> ObjectInfo:
        """Type and name of the object at `header`; HandleError if its memory is unreadable."""
        known = self.decoded.get(header)
        if known is None:
            type_name, source = self._header(header)
            known = ObjectInfo(header, header + self.body_offset, type_name, self._name(source))
            self.decoded[header] = known
        return known

    def prefetch(self, headers: list[int]) -> None:
        """Bring many objects' headers, then their name strings, into the cache in few reads."""
        fresh = [h for h in set(headers) if h not in self.decoded]
        if not fresh:
            return
        before, after = HEADER_REACH
        self.space.prefetch([(h - before, before + after) for h in fresh])
        strings = []
        for header in fresh:
            try:
                _type, source = self._header(header)
            except HandleError:
                continue
            if source is not None and source[0] == "ustr":
                strings.append(source[1])
            elif source is not None and source[0] == "File":
                strings.append(source[1] + self.file_name_offset)
        self.space.prefetch(self._string_buffers(strings))
