"""The one B-tree walker: every tree traversal (engine range reads, check, repair, the tools) goes through it.

Layer: btree. May import: thinpool.errors, thinpool.btree.node, thinpool.btree.spine, thinpool.io, thinpool.tx.

Modelled on thin-provisioning-tools' ``btree_walker.rs``: a depth-first, key-ordered walk that hands each node to
a visitor, with

- a **source**: a TransactionManager (nodes come through its NodeCache: dirty nodes of the open transaction,
  then cached, then read and validated) or a bare BlockStore (every node read from the store and validated by
  ``decode_node``; what check and repair use, since they trust nothing but checksums);
- a **policy**: ``STRICT`` raises the first MetadataCorrupt (with ``path``, the blocks from the root down to the
  bad node, filled in); ``SALVAGE`` hands each error to ``Visitor.error`` and skips that subtree;
- the **key range** of every child: a node reached through entry ``i`` of its parent may hold keys in
  ``[parent.keys[i], parent.keys[i+1])`` (the last child inherits its parent's upper bound): ``Where.lo/hi``;
  a walk limited to ``[lo, hi)`` skips children outside it;
- an optional **memo** of blocks already walked (shared between walks when passed in; without one, nothing is
  remembered and memory stays O(depth x fanout)): a block reached again is not read again; a block that failed
  stays failed (its error is reported once). On a revisit the walker either skips the subtree
  (``revisit="skip"``) or replays its leaves from the memo (``revisit="replay"``, what the checker needs to check
  key order across a tree that shares subtrees with one walked before);
- MAX_DEPTH (btree/node.py) bounds the depth; a child pointer to an ancestor is a cycle, reported against the
  node holding the pointer; so is a pointer beyond the metadata device.

Usage::

    class Count(Visitor):
        def __init__(self): self.n = 0
        def leaf(self, view, where): self.n += len(view.keys)

    v = Count()
    walk(tm_or_store, root, v, value_size=8)

Visitors see NodeView (keys as a uint64 numpy array, values as a numpy array or a list of bytes), never a Node.
Memory O(depth x fanout) plus the memo. Time O(nodes walked).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

from thinpool.btree.node import MAX_DEPTH, FrozenNode, Node, decode_frozen, decode_node
from thinpool.errors import MetadataCorrupt, MetadataError, StoreIOError
from thinpool.io.block_store import BlockStore
from thinpool.units import lazy_module

if TYPE_CHECKING:
    import numpy as np

    from thinpool.btree.spine import NodeCache
    from thinpool.tx.transaction import TransactionManager

    Source = TransactionManager | BlockStore  # where nodes come from
else:
    np = lazy_module("numpy")

STRICT: Final = "strict"
SALVAGE: Final = "salvage"

AnyNode = Node | FrozenNode  # FrozenNode: a store read by a visitor walk (numpy views, no copies)
Memo = dict[int, AnyNode | None]


def _tm_of(source: Source) -> TransactionManager | None:
    """``source`` if it is a TransactionManager, else None (a BlockStore). A read-only tool walking a bare store
    (``thinpool ls``) never imports the transaction manager, the node cache or numpy: an object can only be a
    TransactionManager once its module is loaded, so the module is looked up, not imported."""
    tx = sys.modules.get("thinpool.tx.transaction")
    return source if tx is not None and isinstance(source, tx.TransactionManager) else None


def _node_cache(tm: TransactionManager) -> NodeCache:
    from thinpool.btree.spine import NodeCache

    return NodeCache.of(tm)


class Where(NamedTuple):
    """Where a node was reached: ``path`` holds the blocks from the root down to its parent (empty for the
    root); its keys must lie in ``[lo, hi)`` (``hi`` None: unbounded), the intersection of the ranges its
    ancestors' keys give; ``first`` is False when the node was already walked (a shared subtree, or a replay from
    the memo)."""

    path: tuple[int, ...]
    lo: int
    hi: int | None
    first: bool = True
    parent_key: int | None = None  # the parent's key for this child (None for the root)

    @property
    def is_root(self) -> bool:
        return not self.path


class NodeView:
    """A read-only view of one validated node for visitors."""

    __slots__ = ("_node",)

    def __init__(self, node: Node | FrozenNode) -> None:
        self._node = node

    @property
    def block(self) -> int:
        return self._node.block

    @property
    def is_leaf(self) -> bool:
        return self._node.is_leaf

    @property
    def nr_entries(self) -> int:
        return len(self._node.keys)

    @property
    def max_entries(self) -> int:
        return self._node.max_entries

    @property
    def value_size(self) -> int:
        return self._node.value_size

    @property
    def keys(self) -> np.ndarray:
        """uint64 keys (a read-only view)."""
        k = self._node.keys
        return k if isinstance(k, np.ndarray) else np.frombuffer(k, dtype=np.uint64)

    @property
    def first_key(self) -> int:
        """keys[0] as an int (no array made); the node must not be empty."""
        return int(self._node.keys[0])

    @property
    def last_key(self) -> int:
        return int(self._node.keys[-1])

    @property
    def values(self) -> Any:
        """Children (internal, uint64), 8- or 4-byte values (numpy), or a list of bytes (wider values)."""
        v = self._node.values
        if isinstance(v, (list, np.ndarray)):
            return v
        return np.frombuffer(v, dtype=np.uint64 if v.typecode == "Q" else np.uint32)


class Visitor:
    """Callbacks of a walk; every method has a default. Subclass and override what you need."""

    def ref(self, b: int, where: Where) -> bool:
        """A pointer to ``b`` is about to be followed (the root too); return False to skip it."""
        return True

    def node(self, view: NodeView, where: Where) -> None:
        """Every reference that reaches a readable node, before its children (also on revisits)."""

    def leaf(self, view: NodeView, where: Where) -> None:
        """Each leaf, in key order (again on a replay, with ``where.first`` False)."""

    def revisit(self, b: int, where: Where) -> None:
        """``b`` was already walked (found in the memo)."""

    def node_end(self, view: NodeView, where: Where) -> None:
        """An internal node after all its children were walked (post-order; first visits only): where a
        visitor folds its children's results into the node's (the checker's subtree summaries)."""

    def error(self, err: MetadataCorrupt, where: Where) -> None:
        """Under the SALVAGE policy: ``err`` (with ``path`` filled) was found; its subtree is skipped."""


class _Walker:
    def __init__(self, source: Source, value_size: int, visitor: Visitor, policy: str, memo: Memo | None,
                 lo: int, hi: int | None, revisit: str, frozen: bool = False) -> None:
        self.frozen = frozen  # store reads decoded as numpy views (FrozenNode): for walks that only look
        if policy not in (STRICT, SALVAGE) or revisit not in ("replay", "skip"):
            raise ValueError(f"bad walk policy {policy!r} / revisit {revisit!r}")
        self.vs = value_size
        self.visitor = visitor
        self.strict = policy == STRICT
        self.memo: Memo | None = memo
        self.lo, self.hi = lo, hi
        self.replay = revisit == "replay"
        tm = _tm_of(source)
        if tm is not None:
            self.nodes: NodeCache | None = _node_cache(tm)
            self.store = tm.store
            self.limit = tm.limit
        else:
            self.nodes = None
            self.store = cast(BlockStore, source)
            self.limit = self.store.nr_blocks

    def fail(self, err: MetadataCorrupt, where: Where, block: int | None = None) -> None:
        path = where.path + ((block,) if block is not None else ())
        err.path = path  # type: ignore[attr-defined]
        err.fields["path"] = path
        if self.strict:
            raise err
        self.visitor.error(err, where)

    def read(self, b: int) -> AnyNode:
        if self.nodes is not None:
            return self.nodes.read(b, self.vs)
        if self.frozen:
            return decode_frozen(self.store.read_block(b), b, self.vs)
        return decode_node(self.store.read_block(b), b, self.vs)

    def visit(self, b: int, where: Where) -> Iterator[tuple[AnyNode, Where]]:
        """Walk the subtree at ``b``; yields (leaf, where) in key order."""
        path = where.path
        if path:
            parent = path[-1]
            if b in path:
                self.fail(MetadataCorrupt(block=parent, reason=f"cycle in btree: child pointer {b} of block {parent} "
                                                               "points at an ancestor", found_by="walker"), where)
                return
            if not 0 <= b < self.limit:
                self.fail(MetadataCorrupt(block=parent, reason=f"btree node has child pointer {b} beyond the "
                                                               f"metadata device ({self.limit} blocks)",
                                          found_by="walker"), where)
                return
        visitor = self.visitor
        if not visitor.ref(b, where):
            return
        memo = self.memo
        first = memo is None or b not in memo
        if first:
            try:
                node: AnyNode | None = self.read(b)
            except MetadataCorrupt as e:
                if memo is not None:
                    memo[b] = None
                self.fail(e, where, b)
                return
            except (MetadataError, StoreIOError) as e:
                if self.strict:
                    raise
                if memo is not None:
                    memo[b] = None
                self.fail(MetadataCorrupt(block=b, reason=str(e)), where, b)
                return
            if memo is not None:
                memo[b] = node
        else:
            assert memo is not None
            node = memo[b]
            visitor.revisit(b, where)
            if node is None or not self.replay:
                return
        assert node is not None
        here = Where(path, where.lo, where.hi, first, where.parent_key)
        if node.is_leaf and node.value_size != self.vs:  # a block already walked as part of another kind of tree
            self.fail(MetadataCorrupt(block=b, reason=f"value size mismatch: expected {self.vs}, but got "
                                                      f"{node.value_size}", found_by="walker"), here, b)
            return
        visitor.node(NodeView(node), here)
        if len(path) > MAX_DEPTH:
            self.fail(MetadataCorrupt(block=b, reason="btree too deep", found_by="walker"), here, b)
            return
        if node.is_leaf:
            yield node, here
            return
        if not first and not self.replay:
            return
        yield from self.children(node, where, first)
        if first:
            visitor.node_end(NodeView(node), here)

    def children(self, node: AnyNode, where: Where, first: bool) -> Iterator[tuple[AnyNode, Where]]:
        keys: Any = node.keys
        vals: Any = node.values
        if isinstance(node, FrozenNode):  # numpy views: plain ints for the per-child arithmetic
            keys, vals = keys.tolist(), vals.tolist()
        n = len(keys)
        sub_path = where.path + (node.block,)
        lo, hi = self.lo, self.hi
        for i in range(n):
            c_hi = keys[i + 1] if i + 1 < n else where.hi
            if c_hi is not None and c_hi <= lo:
                continue
            if hi is not None and keys[i] >= hi:
                break
            if where.hi is not None and (c_hi is None or c_hi > where.hi):
                c_hi = where.hi
            child = int(vals[i])
            w = Where(sub_path, max(keys[i], where.lo), c_hi, first, keys[i])
            if first:
                yield from self.visit(child, w)
            else:
                yield from self.replay_subtree(child, w)

    def replay_subtree(self, b: int, where: Where) -> Iterator[tuple[AnyNode, Where]]:
        """Leaves under ``b`` from the memo only (no reads, no node callbacks): a revisited shared subtree."""
        node = self.memo.get(b) if self.memo is not None else None
        if b in where.path or node is None or (node.is_leaf and node.value_size != self.vs):
            return
        if node.is_leaf:
            yield node, where
            return
        yield from self.children(node, where, False)


def memo_leaves(memo: Memo, root: int, value_size: int) -> list[NodeView] | None:
    """The leaves under ``root`` as a previous walk left them in ``memo``, in key order; None when a block of
    it is missing or failed (or a leaf has another value size)."""
    out: list[NodeView] = []

    def go(b: int, path: tuple[int, ...]) -> bool:
        node = memo.get(b)
        if b in path or node is None:
            return node is not None
        if node.is_leaf:
            if node.value_size != value_size:
                return False
            out.append(NodeView(node))
            return True
        return all(go(int(c), path + (b,)) for c in node.values)

    return out if go(root, ()) else None


def read_view(source: Source, block: int, *, value_size: int) -> NodeView:
    """One node, validated as the walker validates it (``decode_node``; through the node cache when ``source``
    is a TransactionManager): for code that descends trees itself (thin_delta's paired descent).

    Raises:
        MetadataCorrupt / ChecksumError naming ``block`` (a block beyond the metadata device included).
    """
    tm = _tm_of(source)
    if tm is not None:
        return NodeView(_node_cache(tm).read(block, value_size))
    source = cast(BlockStore, source)
    if not 0 <= block < source.nr_blocks:
        raise MetadataCorrupt(block=block, reason=f"btree node pointer {block} beyond the metadata device "
                                                  f"({source.nr_blocks} blocks)")
    return NodeView(decode_frozen(source.read_block(block), block, value_size))


def walk_nodes(source: Source, root: int, *, value_size: int, visitor: Visitor | None = None,
               policy: str = STRICT, memo: Memo | None = None, lo: int = 0, hi: int | None = None,
               revisit: str = "replay") -> Iterator[tuple[Node, Where]]:
    """The walk as a generator of (leaf Node, Where), for code inside btree/ (BTree.leaves)."""
    w = _Walker(source, value_size, visitor or Visitor(), policy, memo, lo, hi, revisit)
    return w.visit(root, Where((), 0, None))  # type: ignore[return-value]  # not frozen: Nodes only


def walk_items(source: Source, root: int, *, value_size: int) -> Iterator[tuple[int, Any]]:
    """(key, value) of every entry in key order, as Python ints (8- and 4-byte values) or bytes (wider), through
    the strict walk, decoded by ``decode_node``: for readers of small trees (the details tree, the top level of
    the mapping tree) that need neither numpy nor a transaction manager (``metadata/readonly.py``).

    Raises:
        MetadataCorrupt (with ``path``) / ChecksumError.
    """
    for node, _ in walk_nodes(source, root, value_size=value_size):
        yield from zip(node.keys, node.values)


def walk_views(source: Source, root: int, *, value_size: int, visitor: Visitor | None = None,
               policy: str = STRICT, memo: Memo | None = None, lo: int = 0,
               hi: int | None = None) -> Iterator[tuple[NodeView, Where]]:
    """The walk as a generator of (leaf NodeView, Where) for readers outside btree/ (the metadata IR): nodes
    read from a store are decoded as views of their blocks (no copies)."""
    w = _Walker(source, value_size, visitor or Visitor(), policy, memo, lo, hi, "replay", frozen=True)
    for node, where in w.visit(root, Where((), 0, None)):
        yield NodeView(node), where


def walk(source: Source, root: int, visitor: Visitor, *, value_size: int, policy: str = STRICT,
         memo: Memo | None = None, lo: int = 0, hi: int | None = None, revisit: str = "replay") -> None:
    """Walk the tree at ``root`` whose leaves hold ``value_size``-byte values, calling ``visitor``.

    Args:
        source: a TransactionManager (cached, sees the open transaction) or a BlockStore (reads the store).
        policy: STRICT (raise the first error) or SALVAGE (``visitor.error`` and skip the subtree).
        memo: blocks already walked, shared between walks (pass the same dict to walk several trees); None
            (the default) remembers nothing.
        lo, hi: only subtrees that may hold keys in [lo, hi) are walked (leaves are not filtered).
        revisit: "replay" (a memoized subtree's leaves are replayed) or "skip".

    Raises:
        MetadataCorrupt (STRICT): with ``block`` and ``path`` of the damage.
    """
    w = _Walker(source, value_size, visitor, policy, memo, lo, hi, revisit, frozen=True)
    for node, where in w.visit(root, Where((), 0, None)):
        visitor.leaf(NodeView(node), where)
