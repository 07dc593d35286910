"""Review: data blocks shared 2, 3, 255, 256 and more times (counts above 2 live in the ref-count tree).

- restore of XML whose devices all map the same blocks: both real checkers accept, C++ thin_dump gives the XML
  back, and the pool opens and deletes the devices one by one down to none (every count crossing 3 and 2 on the
  way down), each step accepted by both checkers at the points where the counts cross;
- a pool whose device is snapshotted 260 times (snapshots of snapshots, random sector writes breaking sharing in
  between), then deleted in random order: reads equal a byte model throughout, and both checkers and thinpool's
  check accept the metadata at each count boundary on the way up and down.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
from conftest import need_tool
from oracles import assert_thin_check

from thinpool.pool import Pool

CH = 64 << 10


def _xml(nr_devices: int, nr_blocks: int) -> str:
    out = [f'<superblock uuid="" time="1" transaction="3" flags="0" version="2" data_block_size="128" '
           f'nr_data_blocks="{nr_blocks + 10}">']
    for d in range(nr_devices):
        out.append(f'  <device dev_id="{d + 1}" mapped_blocks="{nr_blocks}" transaction="0" creation_time="0" '
                   f'snap_time="1">')
        out.append(f'    <range_mapping origin_begin="0" data_begin="0" length="{nr_blocks}" time="0"/>')
        out.append("  </device>")
    out.append("</superblock>")
    return "\n".join(out) + "\n"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["thinpool", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.external
@pytest.mark.parametrize("nr_devices", [2, 3, 255, 256, 300])
def test_restore_of_blocks_shared_n_times_then_deletes_down_to_none(tmp_path: Path, nr_devices: int) -> None:
    need_tool("thin_check", "thin_dump")
    xml = tmp_path / "in.xml"
    xml.write_text(_xml(nr_devices, 40))
    pool = tmp_path / "pool"
    assert _cli("pool", "create", str(pool), "--size", str(64 * CH)).returncode == 0
    r = _cli("restore", "-i", str(xml), "-o", str(pool), "-f", "-q")
    assert r.returncode == 0, r.stderr
    md = pool / "metadata"
    assert_thin_check(md)
    dumped = subprocess.run(["thin_dump", str(md)], capture_output=True, text=True, check=True).stdout
    assert dumped.split("\n", 1)[1] == xml.read_text().split("\n", 1)[1]
    with Pool.open(pool) as p:
        ids = p.list_devices()
        assert len(ids) == nr_devices
        rng = random.Random(nr_devices)
        rng.shuffle(ids)
        for i, d in enumerate(ids):
            p.delete_thin(d)
            left = nr_devices - i - 1
            if left in (256, 255, 3, 2, 1, 0):
                assert_thin_check(md, what=f"{left} devices left")
        assert p.nr_allocated_data_blocks == 0


@pytest.mark.external
def test_260_snapshots_then_deletes_cross_every_count_boundary(tmp_path: Path) -> None:
    need_tool("thin_check")
    path = tmp_path / "pool"
    base = random.Random(0).randbytes(4 * CH)
    p = Pool.create(path, data_size=2048 * CH, chunk_size=CH)
    model: dict[int, bytearray] = {0: bytearray(base)}
    rng = random.Random(1)
    md = path / "metadata"

    def scribble() -> None:
        d = rng.choice(sorted(model))
        off = rng.randrange(0, 4 * CH - 4096, 512)
        data = rng.randbytes(4096)
        p.device(d).write(off, data)
        model[d][off:off + len(data)] = data

    def checked(what: str) -> None:
        p.commit()
        assert_thin_check(md, what=what)
        r = _cli("check", str(md))
        assert r.returncode == 0, r.stderr

    try:
        p.create_thin(0, 4 * CH).write(0, base)
        nxt = 1
        for i in range(260):
            src = rng.choice(sorted(model))
            p.create_snap(nxt, src)
            model[nxt] = bytearray(model[src])
            nxt += 1
            if rng.random() < 0.2:
                scribble()
            if len(model) in (3, 4, 255, 256, 257, 261):
                checked(f"{len(model)} devices")
        for d in rng.sample(sorted(model), 20):
            assert p.device(d).read(0, 4 * CH) == bytes(model[d])
        while len(model) > 1:
            d = rng.choice(sorted(model))
            if rng.random() < 0.3:
                scribble()
            p.delete_thin(d)
            del model[d]
            if len(model) in (256, 255, 4, 3, 2, 1):
                checked(f"down to {len(model)} devices")
        for d, m in model.items():
            assert p.device(d).read(0, 4 * CH) == bytes(m)
    finally:
        p.close()
    with Pool.open(path, readonly=True) as ro:
        for d, m in model.items():
            assert ro.device(d).read(0, 4 * CH) == bytes(m)


@pytest.mark.external
@pytest.mark.parametrize("nr_devices", [3, 256])
@pytest.mark.parametrize("damage", ["zeroed", "one byte flipped", "keys cleared"])
def test_repair_of_a_damaged_ref_count_tree(tmp_path: Path, nr_devices: int, damage: str) -> None:
    """The data space map's ref-count tree (the counts of blocks shared 3 or more times) damaged: thinpool's
    check and thin_check refuse the metadata; ``pool repair`` rebuilds it from the mappings: both checkers
    accept the result, which holds the same devices and mappings (repair gives devices that share blocks a newer
    snap_time, by design)."""
    need_tool("thin_check", "thin_dump")
    import re

    from thinpool.formats.superblock import parse_superblock

    xml = tmp_path / "in.xml"
    xml.write_text(_xml(nr_devices, 40))
    md = tmp_path / "md.bin"
    assert _cli("restore", "-i", str(xml), "-o", str(md), "-q").returncode == 0
    rc_root = parse_superblock(md.read_bytes()[:4096]).data_sm_root.ref_count_root
    assert rc_root
    with open(md, "r+b") as f:
        f.seek(rc_root * 4096)
        blk = bytearray(f.read(4096))
        if damage == "zeroed":
            blk = bytearray(4096)
        elif damage == "one byte flipped":
            blk[100] ^= 0xFF
        else:
            blk[56:112] = bytes(56)  # some of the keys
        f.seek(rc_root * 4096)
        f.write(blk)
    assert subprocess.run(["thin_check", str(md)], capture_output=True).returncode != 0
    assert _cli("check", str(md)).returncode != 0
    out = tmp_path / "repaired.bin"
    r = _cli("pool", "repair", str(md), str(out))
    assert r.returncode == 0, r.stderr
    assert_thin_check(out)
    got = subprocess.run(["thin_dump", str(out)], capture_output=True, text=True, check=True).stdout

    def strip(s: str) -> str:
        return re.sub(r' snap_time="\d+"', "", s.split("\n", 1)[1])

    assert strip(got) == strip(xml.read_text())
