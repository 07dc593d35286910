"""One decoded B-tree node: keys and values in compact arrays, decoded from / encoded to a 4 KiB block.

Layer: btree. May import: thinpool.errors, thinpool.formats, thinpool.checksum (numpy when already loaded).

Keys are an ``array('Q')``; values are ``array('Q')`` (value_size 8: children, block_times, subtree roots),
``array('I')`` (value_size 4: reference counts) or a list of bytes (16: index entries, 24: device details).
Arrays make insertion a memmove and encoding a single ``tobytes``. Python arrays are in the machine's order;
the block is little-endian, so on a big-endian machine decode and encode swap bytes (one pass each).
"""

from __future__ import annotations

import operator
import sys
from array import array
from typing import TYPE_CHECKING, Any, Final

from thinpool import checksum
from thinpool.checksum import BlockType
from thinpool.errors import MetadataCorrupt
from thinpool.formats.btree_node import INTERNAL_NODE, LEAF_NODE, NODE_HEADER_FMT, NODE_HEADER_SIZE, calc_max_entries

if TYPE_CHECKING:  # a type only: a string forward reference evaluated at import costs the first compile() (~2 ms)
    Values = array[int] | list[bytes]

MAX_DEPTH: Final = 12  # a 4 KiB-node tree over 2^64 keys is at most ~8 deep; deeper means a cycle
_SWAP: Final = sys.byteorder != "little"


def _le_bytes(a: array[int]) -> bytes:
    if _SWAP:
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def _from_le(typecode: str, buf: bytes) -> array[int]:
    a = array(typecode)
    a.frombytes(buf)
    if _SWAP:
        a.byteswap()
    return a


def empty_values(value_size: int) -> Values:
    if value_size == 8:
        return array("Q")
    if value_size == 4:
        return array("I")
    return []


class Node:
    __slots__ = ("block", "is_leaf", "keys", "values", "value_size", "max_entries")

    def __init__(self, block: int, is_leaf: bool, value_size: int, keys: array[int] | None = None,
                 values: Values | None = None, max_entries: int | None = None) -> None:
        self.block = block
        self.is_leaf = is_leaf
        self.value_size = value_size
        self.max_entries = calc_max_entries(value_size) if max_entries is None else max_entries
        self.keys: array[int] = array("Q") if keys is None else keys
        # array('Q') / array('I') or list[bytes]: typed Any because the tree applies the same sequence
        # operations (slices, insert, del, extend) to both, which a Union cannot express to mypy.
        self.values: Any = empty_values(value_size) if values is None else values

    @property
    def nr_entries(self) -> int:
        return len(self.keys)

    def copy(self, block: int) -> Node:
        vals = self.values[:] if not isinstance(self.values, list) else list(self.values)
        return Node(block, self.is_leaf, self.value_size, array("Q", self.keys), vals, self.max_entries)

    def encode(self) -> bytearray:
        """The node as a checksummed 4 KiB block."""
        n = len(self.keys)
        buf = bytearray(4096)
        NODE_HEADER_FMT.pack_into(buf, 0, 0, LEAF_NODE if self.is_leaf else INTERNAL_NODE, self.block, n,
                                  self.max_entries, self.value_size, 0)
        kb = _le_bytes(self.keys)
        buf[NODE_HEADER_SIZE:NODE_HEADER_SIZE + len(kb)] = kb
        vbase = NODE_HEADER_SIZE + 8 * self.max_entries
        vb = _le_bytes(self.values) if not isinstance(self.values, list) else b"".join(self.values)
        buf[vbase:vbase + len(vb)] = vb
        checksum.stamp(buf, BlockType.BTREE_NODE)
        return buf


def _header(buf: bytes, block: int, leaf_value_size: int, verify_csum: bool) -> tuple[bool, int, int, int]:
    """The checks every decode makes before the arrays: (is_leaf, nr_entries, max_entries, value_size)."""
    if verify_csum:
        checksum.verify(buf, BlockType.BTREE_NODE, block)
    _csum, flags, blocknr, nr, max_entries, value_size, _pad = NODE_HEADER_FMT.unpack_from(buf, 0)
    if blocknr != block:
        raise MetadataCorrupt(block=block, reason=f"bad block nr in btree node: says {blocknr}")
    if flags == LEAF_NODE:
        is_leaf = True
    elif flags == INTERNAL_NODE:
        is_leaf = False
    else:
        raise MetadataCorrupt(block=block, reason=f"btree node has bad flags {flags}")
    expected_vs = leaf_value_size if is_leaf else 8
    if value_size != expected_vs:
        raise MetadataCorrupt(block=block, reason=f"value size mismatch: expected {expected_vs}, but got {value_size}")
    if max_entries % 3 or max_entries == 0 or NODE_HEADER_SIZE + max_entries * (8 + value_size) > 4096:
        raise MetadataCorrupt(block=block, reason=f"bad max_entries {max_entries} for value size {value_size}")
    if nr > max_entries:
        raise MetadataCorrupt(block=block, reason=f"nr_entries {nr} > max_entries {max_entries}")
    return is_leaf, nr, max_entries, value_size


def decode_node(buf: bytes, block: int, leaf_value_size: int, *, verify_csum: bool = True) -> Node:
    """Validate and decode a node read from ``block``.

    Checks (kernel node_check plus thin_check's per-node rules): checksum, self block number, flags, max_entries
    fits and is a multiple of 3, nr_entries <= max_entries, value size (8 for internal nodes, the tree's leaf
    value size for leaves), keys strictly increasing.

    Raises:
        MetadataCorrupt / ChecksumError naming ``block``.
    """
    is_leaf, nr, max_entries, value_size = _header(buf, block, leaf_value_size, verify_csum)
    keys = _from_le("Q", buf[NODE_HEADER_SIZE:NODE_HEADER_SIZE + 8 * nr])
    if nr > 1:  # strictly increasing keys
        frombuffer = getattr(sys.modules.get("numpy"), "frombuffer", None)  # None too while numpy is importing
        if frombuffer is not None:  # one vectorised comparison, 1.8 us a full node (a Python loop: ~8 us)
            k = frombuffer(buf, dtype="<u8", count=nr, offset=NODE_HEADER_SIZE)
            ordered = bool((k[1:] > k[:-1]).all())
        else:  # numpy not loaded: a command decoding a few nodes should not pay its 40 ms import for this
            ordered = all(map(operator.lt, keys, keys[1:]))
        if not ordered:
            i = next(j for j in range(1, nr) if keys[j] <= keys[j - 1])
            raise MetadataCorrupt(block=block, reason=f"keys out of order at entry {i} ({keys[i - 1]} >= {keys[i]})")
    vbase = NODE_HEADER_SIZE + 8 * max_entries
    vbytes = buf[vbase:vbase + value_size * nr]
    values: Values
    if value_size == 8:
        values = _from_le("Q", vbytes)
    elif value_size == 4:
        values = _from_le("I", vbytes)
    else:
        values = [bytes(vbytes[i * value_size:(i + 1) * value_size]) for i in range(nr)]
    return Node(block, is_leaf, value_size, keys, values, max_entries)


class FrozenNode:
    """A validated node for a read-only walk: keys and values are little-endian numpy views of the block it was
    read from (no copies; never changed, never written). Values wider than 8 bytes are a list of bytes."""

    __slots__ = ("block", "is_leaf", "keys", "values", "value_size", "max_entries")

    def __init__(self, block: int, is_leaf: bool, value_size: int, keys: Any, values: Any, max_entries: int) -> None:
        self.block = block
        self.is_leaf = is_leaf
        self.value_size = value_size
        self.keys = keys
        self.values = values
        self.max_entries = max_entries

    @property
    def nr_entries(self) -> int:
        return len(self.keys)


def decode_frozen(buf: bytes, block: int, leaf_value_size: int) -> FrozenNode:
    """``decode_node``'s checks, with numpy views instead of copies (for readers that only look).

    Raises:
        MetadataCorrupt / ChecksumError naming ``block``.
    """
    import numpy as np

    is_leaf, nr, max_entries, value_size = _header(buf, block, leaf_value_size, True)
    keys = np.frombuffer(buf, dtype="<u8", count=nr, offset=NODE_HEADER_SIZE)
    if nr > 1 and not bool((keys[1:] > keys[:-1]).all()):
        i = int(np.argmax(keys[1:] <= keys[:-1])) + 1
        raise MetadataCorrupt(block=block, reason=f"keys out of order at entry {i} ({keys[i - 1]} >= {keys[i]})")
    vbase = NODE_HEADER_SIZE + 8 * max_entries
    values: Any
    if value_size in (8, 4):
        values = np.frombuffer(buf, dtype="<u8" if value_size == 8 else "<u4", count=nr, offset=vbase)
    else:
        values = [bytes(buf[vbase + i * value_size:vbase + (i + 1) * value_size]) for i in range(nr)]
    return FrozenNode(block, is_leaf, value_size, keys, values, max_entries)
