"""Fuzz (issue 7): at least 10,000 mutated metadata images built from the golden images and from pools thinpool
wrote. Bit flips (checksum must catch them), byte/word overwrites and field-aware mutations with the checksum
re-stamped (so the damage reaches deeper validation), block zeroing and copying. For each image: open and read
everything; only typed thinpool errors (MetadataError; MetadataCorrupt naming a block), no hang (test timeout),
no other exception, and no silent wrong read:

- after a raw mutation (checksum not re-stamped) every read that succeeds equals the original;
- after a re-stamped one, every device whose mapping tree (and the superblock, details and top-level trees) does
  not contain the damaged block reads exactly as before;
- on every 10th image the checker runs too: it never raises, and when it passes, open and read raise nothing.

THINPOOL_FUZZ_CASES overrides the count (THINPOOL_LONG=1: 100,000).
"""

from __future__ import annotations

import os
import random
from collections import Counter

import fuzz_images as f
import pytest

from thinpool.errors import MetadataCorrupt, MetadataError
from thinpool.metadata.check import check_metadata

LONG = os.environ.get("THINPOOL_LONG") == "1"
CASES = int(os.environ.get("THINPOOL_FUZZ_CASES", 100_000 if LONG else 10_000))


def _errors(r: f.Read) -> list[BaseException]:
    return r.errors + (r.snap.errors if r.snap is not None else [])


@pytest.mark.timeout(1800 if LONG else 900)  # hang guards: the short run took 12-52 s at load 4-6 (CI shares this host)
def test_fuzz_mutated_metadata_images() -> None:
    images = f.load_golden()
    assert images, "no golden images found"
    images.update(f.thinpool_images())
    base = {}
    for name, img in images.items():
        orig = f.full_read(img)
        assert not [e for e in orig.errors if type(e).__name__ != "NeedsCheck"], (name, orig.errors)
        probe = {dev: [int(k) for k in f.np_keys(m)[:3]] + [int(k) for k in f.np_keys(m)[-3:]] + [10 ** 9]
                 for dev, m in orig.maps.items()}
        orig = f.full_read(img, probe)
        base[name] = (img, f.catalogue(img), orig, f.reach(img), probe)
    names = list(base)
    weights = [0.05 if n.startswith("f7") else 0.1 if n.startswith("f6") else 1.0 for n in names]
    rng = random.Random(20261127)
    stats: Counter[str] = Counter()
    for case in range(CASES):
        name = rng.choices(names, weights)[0]
        img, cat, orig, (common, per_dev), probe = base[name]
        mimg, b, desc, stamped = f.mutate(img, cat, rng)
        where = f"case {case} image {name} block {b} ({cat[b].kind}): {desc}"
        try:
            r = f.full_read(mimg, probe, rw=(case % 8 == 0))
        except MetadataError as e:  # pragma: no cover - full_read collects these
            raise AssertionError(f"{where}: escaped {e!r}") from e
        except Exception as e:
            raise AssertionError(f"{where}: untyped {type(e).__name__}: {e}") from e
        errs = _errors(r)
        for e in errs:
            if isinstance(e, MetadataCorrupt):
                assert isinstance(e.block, int), f"{where}: {e!r} names no block"
        stats["detected" if errs else "undetected"] += 1
        stats[f"{'stamped' if stamped else 'raw'}"] += 1
        # no silent wrong read
        if r.opened:
            failed_devs = {dev for dev in orig.maps if dev not in r.maps}
            if not stamped or b not in common:
                assert r.devices == orig.devices, f"{where}: device details read differently without an error"
            for dev, m in orig.maps.items():
                if dev in failed_devs:
                    continue
                if not stamped or (b not in common and b not in per_dev.get(dev, set())):
                    assert r.maps.get(dev) == m, f"{where}: device {dev} mappings silently differ"
                    assert r.lookups.get(dev) == orig.lookups[dev], f"{where}: device {dev} lookups differ"
                    stats["compared"] += 1
        if case % 10 == 0:
            try:
                store = f.store_of(mimg)
                rep = check_metadata(store)
            except Exception as e:
                raise AssertionError(f"{where}: checker raised {type(e).__name__}: {e}") from e
            stats["checked"] += 1
            if rep.ok:
                stats["checker_ok"] += 1
                corrupt = [e for e in errs if isinstance(e, MetadataCorrupt)]
                assert not corrupt, f"{where}: checker passes but reading fails: {corrupt[0]}"
            else:
                stats["checker_rejects"] += 1
    stats["cases"] = CASES
    print(f"\n[fuzz] {dict(stats)}")
    assert stats["cases"] >= 10_000 or "THINPOOL_FUZZ_CASES" in os.environ
