"""One declarative description per fixed-size on-disk structure, from which its ``struct`` and construct forms come.

Layer: formats. May import: nothing (construct only when a construct Struct is asked for).

A layout is a tuple of (kernel field name, struct code) pairs, little-endian: ``"I"`` u32, ``"Q"`` u64, ``"H"``
u16, ``"Ns"`` N raw bytes. Parsing and building on the hot path (every pool open reads the superblock and device
details) go through the ``struct.Struct`` made from it: one C call, and no construct import (construct costs
~10 ms of every command's start-up). ``Layout.construct()`` builds the construct ``Struct`` of the same fields for
tools and tests; tests/unit/test_formats_fields.py checks both forms agree byte for byte.

``record`` makes the value classes the parsers return (``Superblock``, ``SmRoot``, ``DeviceDetails``, ...): what
``@dataclass(frozen=True, slots=True)`` gives them, without importing ``dataclasses``, which loads ``inspect``
(with ``ast``, ``dis``, ``tokenize``): about 5 ms of the start-up of every command that opens a pool.
"""

from __future__ import annotations

import struct
from typing import Any, TypeVar, dataclass_transform

T = TypeVar("T")

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


@dataclass_transform(frozen_default=True)
def record(cls: type[T]) -> type[T]:
    """A frozen value class with ``__slots__`` from an annotated class body, as ``@dataclass(frozen=True,
    slots=True)`` makes it: ``__init__`` taking the fields in order (positional or by name; a class-level value is
    the default), ``==`` and ``hash`` over the fields (only with the same class), a ``repr`` naming them, no
    attribute assignment or deletion (AttributeError), ``__match_args__``, copy and pickle. ``replace`` makes a
    changed copy. The class body's other attributes (methods, properties, constants) are kept."""
    names = tuple(cls.__dict__.get("__annotations__", {}))
    defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
    ns = {k: v for k, v in cls.__dict__.items() if k not in names and k not in ("__dict__", "__weakref__")}
    params = ", ".join(f"{n}=_default_{n}" if n in defaults else n for n in names)
    body = "".join(f"    _set(self, {n!r}, {n})\n" for n in names) or "    pass\n"
    env: dict[str, Any] = {"_set": object.__setattr__, **{f"_default_{n}": v for n, v in defaults.items()}}
    exec(f"def __init__(self, {params}) -> None:\n{body}", env)  # one small function per class, as dataclasses
    init = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    ns.update(__slots__=names, __init__=init, __match_args__=names, _record_fields=names, __eq__=_eq,
              __hash__=_hash, __repr__=_repr, __setattr__=_frozen, __delattr__=_frozen,
              __getstate__=_fields_of, __setstate__=_setstate)
    made: type[T] = type(cls.__name__, cls.__bases__, ns)
    return made


def replace(obj: T, **changes: Any) -> T:
    """A copy of the record ``obj`` with ``changes`` (as ``dataclasses.replace``). Raises TypeError on a name that
    is not a field."""
    names: tuple[str, ...] = obj._record_fields  # type: ignore[attr-defined]
    bad = set(changes).difference(names)
    if bad:
        raise TypeError(f"{type(obj).__qualname__} has no field {sorted(bad)[0]!r}")
    return type(obj)(**{n: changes[n] if n in changes else getattr(obj, n) for n in names})


def _fields_of(self: Any) -> tuple[Any, ...]:
    return tuple(getattr(self, n) for n in self._record_fields)


def _eq(self: Any, other: object) -> object:  # bool, or NotImplemented
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _fields_of(self) == _fields_of(other)


def _hash(self: Any) -> int:
    return hash(_fields_of(self))


def _repr(self: Any) -> str:
    return f"{type(self).__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._record_fields)})"


def _frozen(self: Any, name: str, *_: Any) -> None:
    raise AttributeError(f"cannot assign to field {name!r} of a frozen {type(self).__qualname__}")


def _setstate(self: Any, state: tuple[Any, ...]) -> None:
    for n, v in zip(self._record_fields, state):
        object.__setattr__(self, n, v)

