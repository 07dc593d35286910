"""What the metadata tool commands share: the TARGET argument, read-only metadata opening, output files written
atomically, device references by id or name, and progress bars.

Layer: cli. May import: click, thinpool (the library only inside the functions).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import IO, Any

import click

from thinpool_cli import ls_fast
from thinpool_cli.params import F, device_ref, is_target, metadata_path, pool_option

BIG_MAPPINGS = 1 << 19  # mappings (about a second of work) from which the tools show progress on a terminal
PROGRESS_ENVVAR = "THINPOOL_PROGRESS_MIN_MAPPINGS"  # overrides BIG_MAPPINGS (tests, or to silence the bars)


def target_option(f: F) -> F:
    """An optional positional TARGET (pool directory or metadata file) plus --pool / $THINPOOL_POOL."""
    return pool_option(click.argument("target", required=False, metavar="[TARGET]")(f))


@contextmanager
def open_metadata(target: str | None, *, use_metadata_snap: bool = False) -> Iterator[Any]:
    """Open a pool directory's or a bare file's metadata read-only (superblock, details and mappings only), on
    a ``tool_store`` (``node_progress(..., pmd.store, ...)`` can meter it)."""
    from thinpool.metadata.pool_metadata import PoolMetadata

    store = tool_store(metadata_path(target))
    try:
        yield PoolMetadata.open(store, readonly=True, space_maps=False, use_metadata_snap=use_metadata_snap)
    finally:
        store.close()


def open_details(target: str | None, *, use_metadata_snap: bool = False) -> AbstractContextManager[Any]:
    """Open a pool directory's or a bare file's metadata as a ``ReadOnlyMetadata`` view: the superblock and the
    device details only (what ``ls`` needs for its default fields; no space map, transaction manager or numpy)."""
    return ls_fast.open_details(metadata_path(target), use_metadata_snap=use_metadata_snap)


@contextmanager
def output_file(path: str | None) -> Iterator[IO[str]]:
    """stdout, or FILE written through a temporary name beside it and renamed when complete (no half-written
    FILE). An error names FILE, never the temporary name."""
    if path is None:
        yield sys.stdout
        return
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        f = open(tmp, "w")
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    try:
        with f:
            try:
                yield f
            except OSError as e:
                if e.filename is None and e.errno is not None:  # a failed write: name FILE, not the temporary
                    raise OSError(e.errno, e.strerror, path) from None
                raise
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def split_target(args: Sequence[str]) -> tuple[list[str], str | None]:
    """Positional arguments -> (the others, the target): the last one is the target when it names a path."""
    rest = list(args)
    if rest and is_target(rest[-1]):
        return rest[:-1], rest[-1]
    return rest, None


def pool_device_names(target: str | None) -> dict[str, int] | None:
    """name -> dev_id from a pool directory's manifest; None when the target is not a pool directory.

    Raises:
        ManifestError: the pool's pool.json is missing or invalid (it says how to recover).
    """
    if not target or not os.path.isdir(target):
        return None
    from thinpool.manifest import read_manifest

    return {e["name"]: int(k) for k, e in read_manifest(target)["devices"].items() if e["name"] is not None}


def resolve_device(ref: str | int, target: str | None) -> int:
    """A device given by id or by name. Names live in a pool directory's pool.json, so a name with a bare
    metadata file is refused with a hint.

    Raises:
        DeviceNotFound (unknown name), DeviceNameNeedsPool (a name, and TARGET is not a pool directory).
    """
    v = ref if isinstance(ref, int) else device_ref(ref)
    if isinstance(v, int):
        return v
    names = pool_device_names(target)
    if names is None:
        from thinpool.errors import DeviceNameNeedsPool

        raise DeviceNameNeedsPool(dev_id=v, path=target or "")
    if v in names:
        return names[v]
    from thinpool.errors import DeviceNotFound

    raise DeviceNotFound(dev_id=v)


def require_devices(md: Any, ids: Sequence[int]) -> None:
    from thinpool.errors import DeviceNotFound

    for d in ids:
        if d not in md.devices:
            raise DeviceNotFound(dev_id=d)


def require_metadata_snap(target: str | None) -> None:
    """-m needs a held metadata snapshot (thin_check/thin_dump refuse otherwise): refuse the same way."""
    ls_fast.require_metadata_snap(metadata_path(target))


def progress_threshold() -> int:
    """Mappings from which a tool shows progress: $THINPOOL_PROGRESS_MIN_MAPPINGS, else BIG_MAPPINGS."""
    try:
        return max(int(os.environ.get(PROGRESS_ENVVAR, BIG_MAPPINGS)), 0)
    except ValueError:
        return BIG_MAPPINGS


@contextmanager
def mapping_progress(description: str, total_mappings: int) -> Iterator[Any]:
    """A progress bar over mappings on a terminal's stderr (rich; transient), for jobs of at least
    ``progress_threshold()`` mappings; nothing otherwise or when stderr is not a terminal."""
    from thinpool_cli.output import progress

    with progress(description, total_mappings, min_total=max(progress_threshold(), 1)) as bar:
        yield bar


METER_STEP = 64  # metadata blocks read between two updates of a bar (keeps the per-read cost to a subtraction)
_METERED: Any = None


def _metered_class() -> Any:
    """``FileBlockStore`` counting the blocks it reads, for ``node_progress`` (the class is made on first use: the
    library is imported only inside the functions)."""
    global _METERED
    if _METERED is None:
        from thinpool.io.block_store import FileBlockStore

        class MeteredStore(FileBlockStore):
            """Counts ``read_block`` calls; every METER_STEP of them hands the count to ``meter`` (when set)."""

            def __init__(self, path: str, *, readonly: bool = False) -> None:
                super().__init__(path, readonly=readonly)
                self.meter: Callable[[int], None] | None = None
                self.nr_read = 0
                self._left = METER_STEP

            def read_block(self, b: int) -> bytes:
                data = FileBlockStore.read_block(self, b)
                self._left -= 1
                if not self._left:
                    self._left = METER_STEP
                    self.nr_read += METER_STEP
                    if self.meter is not None:
                        self.meter(self.nr_read)
                return data

        _METERED = MeteredStore
    return _METERED


def tool_store(path: str, *, readonly: bool = True) -> Any:
    """The store a metadata tool reads: one that counts the blocks read (for ``node_progress``) when stderr is a
    terminal, a plain ``FileBlockStore`` otherwise (nothing added to a read when no bar can show)."""
    if sys.stderr.isatty():
        return _metered_class()(path, readonly=readonly)
    from thinpool.io.block_store import FileBlockStore

    return FileBlockStore(path, readonly=readonly)


def metadata_blocks_in_use(store: Any, *, trees_only: bool = False) -> int:
    """The metadata blocks in use, from the superblock's metadata space-map root (no walk); with ``trees_only``,
    less the space maps' bitmaps and the metadata index (what a tool that reads only the details and mapping
    trees reads); 0 when the superblock is unreadable (the tool reports that itself)."""
    from thinpool.errors import ThinpoolError
    from thinpool.metadata.check import blocks_in_use
    from thinpool.metadata.readonly import read_superblock

    try:
        sb = read_superblock(store)
    except ThinpoolError:
        return 0
    return blocks_in_use(sb, trees_only=trees_only)


@contextmanager
def node_progress(description: str, store: Any, work_mappings: int, *, passes: float = 1,
                  trees_only: bool = True) -> Iterator[None]:
    """A progress bar over metadata nodes for the tools whose work is not linear in mappings (check; ls with
    EXCLUSIVE/SHARED; delta, which skips shared subtrees; map): the total is the metadata blocks in use (times
    ``passes``, for a job that reads the metadata several times; the tree nodes alone with ``trees_only``, for
    a tool that reads no space map), advanced by the blocks ``store`` (from
    ``tool_store``) reads; it completes when the job ends, however much it skipped, and never passes its total
    (a block read twice). On a terminal only (rich, transient): at once when ``work_mappings`` reaches
    ``progress_threshold()``, else once the job has run $THINPOOL_PROGRESS_DELAY seconds."""
    if not isinstance(store, _metered_class()):
        yield
        return
    from thinpool_cli.output import progress

    total = round(metadata_blocks_in_use(store, trees_only=trees_only) * passes)
    with progress(description, total, at_once=work_mappings >= max(progress_threshold(), 1)) as bar:
        start = store.nr_read

        def meter(nr_read: int) -> None:
            bar.update(min(nr_read - start, total))

        store.meter = meter
        try:
            yield
        finally:
            store.meter = None
        bar.update(total)


def total_mapped(md: Any, ids: Sequence[int] | None = None) -> int:
    """Mappings of the devices ``ids`` (default all), from the device details alone."""
    return sum(md.devices[d].mapped_blocks for d in (md.device_ids() if ids is None else ids))
