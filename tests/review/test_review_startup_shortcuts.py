"""Review of the start-up shortcuts: crc32c loaded from its C extension without the package's __init__ (and its
fallback), and units.lazy_module under threads racing for the first attribute (NBD/FUSE workers)."""

from __future__ import annotations

import importlib.machinery as im
import os
import sys
import threading

import crc32c as crc32c_pkg

from thinpool import checksum
from thinpool.checksum import BlockType
from thinpool.units import lazy_module


def test_the_extension_function_is_the_packages_crc32c() -> None:
    for n in (0, 1, 7, 4092, 4096, 1 << 20):
        buf = os.urandom(n)
        assert checksum._crc32c(buf) == crc32c_pkg.crc32c(buf)
        assert checksum._crc32c(memoryview(bytearray(buf))) == crc32c_pkg.crc32c(buf)
    assert checksum._crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_the_fallback_when_the_extension_is_not_found(monkeypatch) -> None:
    monkeypatch.setattr(im.PathFinder, "find_spec", classmethod(lambda cls, *a, **k: None))
    fn = checksum._load_crc32c()
    assert fn(b"123456789") == 0xE3069283


def test_the_fallback_when_the_extension_suffixes_match_nothing(monkeypatch) -> None:
    monkeypatch.setattr(im, "EXTENSION_SUFFIXES", [".no-such-suffix"])
    fn = checksum._load_crc32c()
    assert fn(b"123456789") == 0xE3069283


def test_a_stamped_block_validates_with_either_function(monkeypatch) -> None:
    block = bytearray(os.urandom(4096))
    checksum.stamp(block, BlockType.BTREE_NODE)
    monkeypatch.setattr(checksum, "_crc32c", crc32c_pkg.crc32c)
    assert checksum.identify(block) is BlockType.BTREE_NODE


def test_lazy_module_first_use_from_many_threads(tmp_path, monkeypatch) -> None:
    """Eight threads touch a lazy module at once while its import is slow: each gets the real attribute, the
    module body runs once."""
    (tmp_path / "review_slow_mod.py").write_text(
        "import time\nCOUNT = [0]\nCOUNT[0] += 1\ntime.sleep(0.2)\ndef answer():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("review_slow_mod", None)
    lazy = lazy_module("review_slow_mod")
    got: list[object] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def use() -> None:
        try:
            start.wait()
            got.append(lazy.answer())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=use) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert got == [42] * 8
        assert sys.modules["review_slow_mod"].COUNT == [1]
        assert lazy.COUNT is sys.modules["review_slow_mod"].COUNT
    finally:
        sys.modules.pop("review_slow_mod", None)


def test_lazy_module_of_an_imported_module_is_the_module() -> None:
    import json

    assert lazy_module("json") is json
