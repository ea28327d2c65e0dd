"""The object-type facts discovery checks: ObTypeIndexTable's _OBJECT_TYPEs, the header cookie,
ObpInfoMaskToOffset.

_OBJECT_HEADER.TypeIndex is stored XORed with ObHeaderCookie and the second byte of the
header's address (Win10+); ObTypeIndexTable[i] is the _OBJECT_TYPE whose Index is i, named by
its Name (System's EPROCESS header must decode to "Process", every type object's to "Type").
"""

from __future__ import annotations

from gdbhandles.errors import HandleError
from gdbhandles.windows.kernel import Kernel
from gdbhandles.windows.unicode_string import UnicodeString

MAX_TYPES = 256
MIN_TYPES = 8               # a real table holds 40-70 types
MAX_TYPE_NAME = 64
# Optional object headers in InfoMask bit order (0x01 … 0x40): ObpInfoMaskToOffset's basis.
OPTIONAL_HEADERS = (("_OBJECT_HEADER_CREATOR_INFO",), ("_OBJECT_HEADER_NAME_INFO",),
                    ("_OBJECT_HEADER_HANDLE_INFO",), ("_OBJECT_HEADER_QUOTA_INFO",),
                    ("_OBJECT_HEADER_PROCESS_INFO",),
                    ("_OBJECT_HEADER_EXTENDED_INFO", "_OBJECT_HEADER_AUDIT_INFO"),
                    ("_OBJECT_HEADER_PADDING_INFO",))


def _name(kernel: Kernel, type_object: int) -> str | None:
    layout, space = kernel.layout, kernel.space
    length, buffer = UnicodeString.of(layout).fields(space, type_object + layout.offset("_OBJECT_TYPE", "Name"))
    if not length or length > MAX_TYPE_NAME or length & 1 or buffer >> 47 != 0x1FFFF:
        return None
    text = space.read(buffer, length).decode("utf-16-le", "replace")
    return text if text.isprintable() else None


def read_table(kernel: Kernel, address: int) -> dict[int, str]:
    """index -> type name of a candidate ObTypeIndexTable, from slot 2 to the first empty slot;
    {} unless every entry is an _OBJECT_TYPE whose Index is its slot and "Type" is among them."""
    space, index_field = kernel.space, kernel.layout.field("_OBJECT_TYPE", "Index")
    names = {}
    try:
        pointers = [space.u64(address + 8 * i) for i in range(MAX_TYPES)]
        for index in range(2, MAX_TYPES):
            pointer = pointers[index]
            if not pointer:
                break
            if pointer >> 47 != 0x1FFFF or index_field.read(space.read, pointer) != index:
                return {}
            name = _name(kernel, pointer)
            if name is None:
                return {}
            names[index] = name
    except HandleError:
        return {}
    return names if "Type" in names.values() else {}


def type_name_at(kernel: Kernel, address: int, index: int) -> str | None:
    """The name of slot `index` of the ObTypeIndexTable at `address` alone (a few reads), None
    unless it holds an _OBJECT_TYPE whose Index is `index`."""
    if not 2 <= index < MAX_TYPES:
        return None
    pointer = kernel.space.u64(address + 8 * index)
    if not pointer or pointer >> 47 != 0x1FFFF:
        return None
    if kernel.layout.field("_OBJECT_TYPE", "Index").read(kernel.space.read, pointer) != index:
        return None
    return _name(kernel, pointer)


def _header(kernel: Kernel, body: int) -> int:
    return body - kernel.layout.offset("_OBJECT_HEADER", "Body")


def stored_index(kernel: Kernel, body: int) -> int:
    """The TypeIndex byte as the header of the object at `body` stores it."""
    header = _header(kernel, body)
    field = kernel.layout.field("_OBJECT_HEADER", "TypeIndex")
    return field.read(kernel.space.read, header)


def address_byte(kernel: Kernel, body: int) -> int:
    """The header-address byte TypeIndex is XORed with (Win10+)."""
    return (_header(kernel, body) >> 8) & 0xFF


def decoded_type(kernel: Kernel, types: dict[int, str], body: int, cookie: int | None) -> str | None:
    stored = stored_index(kernel, body)
    return types.get(stored if cookie is None else stored ^ cookie ^ address_byte(kernel, body))


def type_objects(kernel: Kernel, address: int) -> list[int]:
    """The _OBJECT_TYPE bodies of the table at `address` (for checks of their own headers)."""
    out = []
    for index in range(2, MAX_TYPES):
        pointer = kernel.space.u64(address + 8 * index)
        if not pointer:
            break
        out.append(pointer)
    return out


def cookie_by_trial(kernel: Kernel, types: dict[int, str]) -> int | None:
    """The cookie (None: no cookie) under which System's header is a Process and every type
    object's header is a Type; HandleError-free: raises nothing, returns None if no value fits."""
    table = kernel.globals["ObTypeIndexTable"]
    objects = type_objects(kernel, table)
    for cookie in [None] + list(range(256)):
        if decoded_type(kernel, types, kernel.system_process, cookie) != "Process":
            continue
        if all(decoded_type(kernel, types, body, cookie) == "Type" for body in objects):
            return cookie
    return None


def additive(table: bytes) -> bool:
    """ObpInfoMaskToOffset's shape: entry 0 is 0, every entry the sum of its bits' entries,
    and the name-info offset (bit 1) one optional header's size."""
    if len(table) < 128 or table[0] != 0 or not 0x10 <= table[2] <= 0x40:
        return False
    singles = [table[1 << bit] for bit in range(7)]
    return all(table[mask] == sum(s for bit, s in enumerate(singles) if mask & (1 << bit)) & 0xFF
               for mask in range(128))


def info_mask_table(kernel: Kernel) -> bytes:
    """ObpInfoMaskToOffset as the kernel holds it, or computed as ObpInitInfoBlockOffsets does."""
    address = kernel.globals.get("ObpInfoMaskToOffset")
    if address is not None:
        return kernel.space.read(address, 256)
    sizes = []
    for names in OPTIONAL_HEADERS:
        sizes.append(next((kernel.layout.size(n) for n in names if kernel.layout.size(n)), 0))
    return bytes(sum(size for bit, size in enumerate(sizes) if mask & (1 << bit)) & 0xFF
                 for mask in range(256))
