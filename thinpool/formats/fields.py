"""One declarative description per fixed-size on-disk structure, from which its ``struct`` and construct forms come.

Layer: formats. May import: nothing (construct only when a construct Struct is asked for).

A layout is a tuple of (kernel field name, struct code) pairs, little-endian: ``"I"`` u32, ``"Q"`` u64, ``"H"``
u16, ``"Ns"`` N raw bytes. Parsing and building on the hot path (every pool open reads the superblock and device
details) go through the ``struct.Struct`` made from it: one C call, and no construct import (construct costs
~10 ms of every command's start-up). ``Layout.construct()`` builds the construct ``Struct`` of the same fields for
tools and tests; tests/unit/test_formats_fields.py checks both forms agree byte for byte.
"""

from __future__ import annotations

import struct
from typing import Any

_CS_INTS = {"H": "Int16ul", "I": "Int32ul", "Q": "Int64ul"}


class Layout:
    """A fixed-size little-endian structure: field names and struct codes, in the kernel struct's order."""

    __slots__ = ("name", "fields", "names", "fmt", "size", "_cs")

    def __init__(self, name: str, fields: tuple[tuple[str, str], ...]) -> None:
        self.name = name  # the kernel struct's name
        self.fields = fields
        self.names = tuple(f for f, _ in fields)
        self.fmt = struct.Struct("<" + "".join(code for _, code in fields))
        self.size: int = self.fmt.size  # bytes
        self._cs: Any = None

    def unpack(self, buf: bytes | bytearray | memoryview, offset: int = 0) -> dict[str, Any]:
        """The fields of the structure at ``buf[offset:]`` by name. Raises struct.error on a short buffer."""
        return dict(zip(self.names, self.fmt.unpack_from(buf, offset)))

    def pack(self, **values: Any) -> bytes:
        """The structure's bytes; every field must be given. Raises struct.error on a bad value, KeyError on a
        missing field."""
        return self.fmt.pack(*(values[n] for n in self.names))

    def construct(self) -> Any:
        """The construct ``Struct`` of the same fields (built, and construct imported, on first call)."""
        if self._cs is None:
            import construct as cs

            parts = []
            for name, code in self.fields:
                if code.endswith("s"):
                    parts.append(name / cs.Bytes(int(code[:-1])))
                else:
                    parts.append(name / getattr(cs, _CS_INTS[code]))
            self._cs = cs.Struct(*parts)
        return self._cs
