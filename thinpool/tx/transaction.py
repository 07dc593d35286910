"""Transaction manager: validated metadata block access, block allocation through a space map, two-phase commit.

Layer: tx. May import: thinpool.errors, thinpool.checksum, thinpool.io, thinpool.tx.api.

Mirrors the kernel's dm-transaction-manager: it knows blocks, checksums (the per-type validators of
thinpool.checksum) and the SpaceMap protocol of tx/api.py, nothing of B-tree nodes. The space map is injected
(dm_tm_create_with_sm); node decoding, caching, shadowing and inc_children live in the B-tree (btree/spine.py).

- New blocks come from the space map, which never returns a block that the last commit uses, so nothing the
  committed superblock reaches is overwritten before the next commit.
- Dirty blocks are held until ``pre_commit``: ``dirty`` maps a block number to an object whose ``encode()``
  gives the 4 KiB block, checksum stamped (a B-tree node); ``dirty_raw`` holds blocks already encoded and stamped
  (bitmaps, the metadata index, a metadata snapshot's superblock).
- ``pre_commit`` writes every dirty block and syncs; ``commit`` then writes the superblock (block 0) and syncs
  again. ``abort`` drops the dirty blocks. Clients (tx/api.py BlockClient: the node cache) hear of freed and
  reallocated blocks, commits and aborts.
- ``share_gen``, the sharing generation, changes whenever a block shadowed in this transaction could stop being
  writable in place: a reference added to any block (``inc``: a snapshot, a held root, the children of a shared
  node's copy), a block freed (``dec`` to 0), a commit, an abort. The B-tree adds its structural changes (splits,
  merges, rebalancing, removals). While it is unchanged, a node found dirty with count 1 stays so, and shadowing
  it again would return it as it is (what the kernel's dm_tm_shadow_block asks of dm_sm_count_is_more_than_one):
  the mapping tree keeps the leaves it shadowed for later inserts on that (btree/two_level.py).
"""

from __future__ import annotations

from typing import Any, Protocol

from thinpool import checksum
from thinpool.checksum import BlockType
from thinpool.errors import MetadataCorrupt
from thinpool.io.block_store import BlockStore, FileBlockStore
from thinpool.tx.api import BlockClient, SpaceMap


class Encodable(Protocol):
    """A dirty block kept decoded until the commit writes it."""

    def encode(self) -> bytes | bytearray:
        """The block as 4096 bytes with its checksum stamped."""
        ...


RUN_BLOCKS = 256  # consecutive dirty blocks written by one call at most (1 MiB)


class TransactionManager:
    """Block access and allocation for one metadata device inside one open transaction at a time."""

    def __init__(self, store: BlockStore, meta_sm: SpaceMap) -> None:
        self.store = store
        self.sm = meta_sm
        self.dirty: dict[int, Encodable] = {}  # decoded blocks created or shadowed in this transaction
        self.dirty_raw: dict[int, bytearray] = {}  # encoded, stamped blocks to write at the commit
        self.clients: list[BlockClient] = []
        self.blocks_written = 0
        self.blocks_read = 0  # metadata blocks read from the store (tests bound what an open reads)
        self.share_gen = 0  # the sharing generation (see the module docstring)

    def client(self, kind: type[Any]) -> Any | None:
        """The registered client of class ``kind``, or None."""
        for c in self.clients:
            if type(c) is kind:
                return c
        return None

    def add_client(self, c: BlockClient) -> None:
        self.clients.append(c)

    # --- reading --------------------------------------------------------------------------------------------
    def check_range(self, b: int) -> None:
        """Raise MetadataCorrupt for a block number outside the metadata device (store and space map)."""
        if not 0 <= b < self.store.nr_blocks or b >= self.sm.nr_blocks:
            raise MetadataCorrupt(block=b, reason=f"block pointer {b} beyond the metadata device "
                                                  f"({self.limit} blocks)")

    @property
    def limit(self) -> int:
        """Blocks a pointer may address: min(store size, space-map size)."""
        return min(self.store.nr_blocks, self.sm.nr_blocks)

    def read_block(self, b: int) -> bytes:
        """The committed bytes of block ``b`` from the store, range-checked but not validated (the caller's
        validator checks them: a B-tree node is checked by btree/node.py decode_node)."""
        self.check_range(b)
        self.blocks_read += 1
        return self.store.read_block(b)

    def read_raw(self, b: int, block_type: BlockType, what: str = "") -> bytes:
        """Block ``b`` validated for ``block_type`` (checksum.validate: checksum and self block number; ``what``
        names it in the error). A block written in this transaction is returned as queued.

        Raises:
            ChecksumError / MetadataCorrupt naming ``b``.
        """
        if b in self.dirty_raw:
            return bytes(self.dirty_raw[b])
        buf = self.read_block(b)
        checksum.validate(buf, block_type, b, what)
        return buf

    def get_dirty(self, b: int) -> Any | None:
        """The decoded dirty block ``b`` of this transaction, or None."""
        return self.dirty.get(b)

    # --- allocation and reference counts --------------------------------------------------------------------
    def new_block(self) -> int:
        """A block from the space map (count 1); clients drop anything cached for it."""
        b = self.sm.new_block()
        for c in self.clients:
            c.forget(b)
        return b

    def count(self, b: int) -> int:
        return self.sm.count(b)

    def inc(self, b: int) -> None:
        self.share_gen += 1  # (first: a failing inc may still have changed something)
        self.sm.inc(b)

    def dec(self, b: int) -> int:
        """Drop a reference; a block whose count reaches 0 is forgotten (no recursion into children)."""
        c = self.sm.dec(b)
        if c == 0:
            self.share_gen += 1
            self.dirty.pop(b, None)
            self.dirty_raw.pop(b, None)
            for cl in self.clients:
                cl.forget(b)
        return c

    # --- writing --------------------------------------------------------------------------------------------
    def add_dirty(self, b: int, block: Encodable) -> None:
        """Queue a decoded block (created or shadowed in this transaction) for the commit."""
        self.dirty[b] = block

    def write_raw(self, b: int, block: bytearray, block_type: BlockType) -> None:
        """Queue an encoded block for the commit; the checksum is stamped now."""
        checksum.stamp(block, block_type)
        self.dirty_raw[b] = block

    # --- commit / abort -------------------------------------------------------------------------------------
    def pre_commit(self) -> None:
        """Write every dirty block except the superblock, then sync. A store that writes runs (the file store;
        ``FileBlockStore.writes_runs``) gets each run of consecutive blocks, up to RUN_BLOCKS of them, as one call
        (one ``pwritev``): a new 8 TiB pool's 8,347 blocks are a few dozen writes. Blocks are encoded as the run
        grows, so memory stays one run."""
        # a wrapper that intercepts write_block and passes other attributes on to the store it wraps (tests, fault
        # injection) is no FileBlockStore: it keeps seeing every block write
        store = self.store
        write_run = store.write_run if isinstance(store, FileBlockStore) and type(store).writes_runs() else None
        dirty, raw = self.dirty, self.dirty_raw
        if write_run is None:  # block by block, in the order stores and tests have always seen: nodes, then raw
            for b in sorted(dirty):
                store.write_block(b, dirty[b].encode())
            for b in sorted(raw):
                store.write_block(b, raw[b])
            self.blocks_written += len(dirty) + len(raw)
        else:
            order = sorted(dirty.keys() | raw.keys()) if raw and dirty else sorted(dirty or raw)
            start = 0
            run: list[bytes | bytearray] = []
            for b in order:
                if run and (b != start + len(run) or len(run) >= RUN_BLOCKS):
                    write_run(start, run)
                    run = []
                if not run:
                    start = b
                r = raw.get(b)
                run.append(r if r is not None else dirty[b].encode())
            if run:
                write_run(start, run)
            self.blocks_written += len(order)
        store.sync()

    def commit(self, superblock: bytearray) -> None:
        """Write the (stamped) superblock to block 0 and sync; the transaction is then durable."""
        self.store.write_block(0, superblock)
        self.store.sync()
        self.blocks_written += 1
        self.share_gen += 1
        for c in self.clients:
            c.committed()
        self.dirty = {}
        self.dirty_raw = {}

    def abort(self) -> None:
        self.share_gen += 1
        for c in self.clients:
            c.aborted()
        self.dirty = {}
        self.dirty_raw = {}
