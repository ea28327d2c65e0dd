"""The base of the per-structure types: fields bound lazily, once per layout.

A structure type (`EProcess`, `ObjectHeader`, …) names its kernel structure and asks the
layout for a member only when an accessor first needs it, so a layout that lacks one member
breaks only the accessors that read it (volatility3's per-structure extensions behave the
same way). `Struct.of(layout)` returns one shared instance per layout object.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

from gdbhandles.errors import ProfileError
from gdbhandles.windows.layouts import Field, Layout

__all__ = ["Struct"]

S = TypeVar("S", bound="Struct")


class Struct:
    """One kernel structure of one layout; `field()` resolves and caches a member path."""

    NAME: ClassVar[str]

    def __init__(self, layout: Layout):
        self.layout = layout
        self._fields: dict[str, Field | None] = {}

    @classmethod
    def of(cls: type[S], layout: Layout) -> S:
        """The instance bound to `layout` (created on first use; kept by the layout)."""
        found = layout.structs.get(cls)
        if found is None:
            found = layout.structs[cls] = cls(layout)
        return found  # type: ignore[return-value]

    def find(self, path: str) -> Field | None:
        """The member `path` (dotted for embedded structures), or None if this build lacks it."""
        if path not in self._fields:
            self._fields[path] = self.layout.find(self.NAME, path)
        return self._fields[path]

    def field(self, path: str) -> Field:
        """The member `path`; ProfileError naming the structure if the layout lacks it."""
        found = self.find(path)
        if found is None:
            raise ProfileError(f"the layout ({self.layout.source}) has no {self.NAME}.{path}")
        return found

    def offset(self, path: str) -> int:
        return self.field(path).offset

    def size(self) -> int | None:
        """sizeof(NAME) in this build, or None if the layout does not give it."""
        return self.layout.size(self.NAME)

    def span(self, *paths: str) -> tuple[int, int]:
        """(first offset, byte count) covering the members, to read them in one request."""
        fields = [self.field(p) for p in paths]
        start = min(f.offset for f in fields)
        return start, max(f.offset + f.size for f in fields) - start
