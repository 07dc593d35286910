"""Review (review5): ``thinpool ls``'s click-free fast path (cli/ls_fast.py, cli/main.py: 8453678, 6ad8acf,
642cd65, c0fe4cf) where its output can go wrong: the installed console script (the one path that ends with
``os._exit``) against click's path ($THINPOOL_CLICK_ONLY=1), with

- a large listing (4,000 devices, ~140 KB: more than a pipe holds) to a file, to a pipe read whole, to a pipe
  whose reader has gone before the first write (``| head -0``: exit 1, nothing on stderr), to a closed stdout,
  to /dev/full (ENOSPC: the one error line, exit 1), and with SIGPIPE left at its default by the parent;
- damaged metadata (any byte of the superblock, the details tree or the top level of the mapping tree changed, the
  block's checksum stamped again so that only the structure is wrong): the listing raises a ThinpoolError (one
  error line, a documented status), never anything else (a traceback on both paths).

Where both paths must agree, they must give the same bytes on stdout and stderr and the same exit status.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thinpool import checksum
from thinpool.errors import ThinpoolError

pytestmark = pytest.mark.external

NR_DEVICES = 4000
THINPOOL = str(Path(sys.executable).with_name("thinpool"))  # the console script of this interpreter's install


def _xml(n: int, mapped: int = 0) -> str:
    lines = ['<superblock uuid="" time="3" transaction="9" flags="0" version="2" data_block_size="128" '
             'nr_data_blocks="100000">']
    for i in range(n):
        lines.append(f'  <device dev_id="{i}" mapped_blocks="{mapped if i < 3 else 0}" transaction="{i % 7}" '
                     f'creation_time="{i % 3}" snap_time="{i % 3}">')
        if i < 3 and mapped:
            lines.append(f'    <range_mapping origin_begin="0" data_begin="{i * mapped}" length="{mapped}" '
                         'time="0"/>')
        lines.append("  </device>")
    lines.append("</superblock>")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def big_md(tmp_path_factory: pytest.TempPathFactory) -> str:
    need_tool("thin_restore")
    d = tmp_path_factory.mktemp("r5ls")
    (d / "big.xml").write_text(_xml(NR_DEVICES))
    md = d / "metadata"
    with open(md, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["thin_restore", "-i", str(d / "big.xml"), "-o", str(md)], check=True, capture_output=True)
    return str(md)


def _env(path: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("THINPOOL_CLICK_ONLY", None)
    env.pop("THINPOOL_POOL", None)
    if path == "click":
        env["THINPOOL_CLICK_ONLY"] = "1"
    return env


def _run(path: str, args: list[str], **kw) -> subprocess.CompletedProcess[bytes]:  # type: ignore[no-untyped-def]
    return subprocess.run([THINPOOL, "ls", *args], env=_env(path), capture_output=kw.pop("capture", True),
                          timeout=120, **kw)


def _both(args: list[str], **kw) -> tuple[tuple[int, bytes, bytes], ...]:  # type: ignore[no-untyped-def]
    out = []
    for path in ("fast", "click"):
        r = _run(path, args, **kw)
        out.append((r.returncode, r.stdout, r.stderr))
    return tuple(out)


def test_the_console_script_is_this_install() -> None:
    assert os.path.exists(THINPOOL), THINPOOL


@pytest.mark.parametrize("extra", [[], ["--json"], ["--no-headers", "-o", "DEV,TRANSACTION"]])
def test_a_large_listing_is_whole_and_the_same_on_both_paths(big_md: str, extra: list[str]) -> None:
    fast, click = _both([big_md, *extra])
    assert fast == click
    code, out, err = fast
    assert code == 0 and err == b""
    assert len(out) > (16 * 1024 if "--no-headers" in extra else 128 * 1024)
    if extra == ["--json"]:
        import json

        assert len(json.loads(out)) == NR_DEVICES
    else:
        assert out.count(b"\n") == NR_DEVICES + (0 if "--no-headers" in extra else 1)


def test_a_large_listing_to_a_file_and_through_a_pipe(big_md: str, tmp_path: Path) -> None:
    outs = []
    for path in ("fast", "click"):
        f = tmp_path / f"{path}.txt"
        with open(f, "wb") as fh:
            r = subprocess.run([THINPOOL, "ls", big_md], env=_env(path), stdout=fh, stderr=subprocess.PIPE,
                               timeout=120)
        assert (r.returncode, r.stderr) == (0, b"")
        p = subprocess.Popen([THINPOOL, "ls", big_md], env=_env(path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        piped, perr = p.communicate(timeout=120)
        assert (p.returncode, perr) == (0, b"")
        assert piped == f.read_bytes()
        outs.append(piped)
    assert outs[0] == outs[1]


def _reader_gone_before(path: str, md: str, *, sigpipe_default: bool) -> tuple[int, bytes]:
    """``thinpool ls MD | head -0`` made deterministic: the pipe's read end is closed before the child starts."""
    r, w = os.pipe()
    os.close(r)
    try:
        pre = (lambda: signal.signal(signal.SIGPIPE, signal.SIG_DFL)) if sigpipe_default else None
        p = subprocess.run([THINPOOL, "ls", md], env=_env(path), stdout=w, stderr=subprocess.PIPE, timeout=120,
                           preexec_fn=pre)
    finally:
        os.close(w)
    return p.returncode, p.stderr


@pytest.mark.parametrize("sigpipe_default", [False, True])
def test_a_reader_gone_before_the_first_write(big_md: str, tmp_path: Path, sigpipe_default: bool) -> None:
    """Exit 1, quietly (README: a reader that went away), on both paths, large and small listings; Python ignores
    SIGPIPE whatever the parent left it at, so the write fails with EPIPE and is not a kill."""
    small = tmp_path / "small"
    with open(small, "wb") as f:
        f.truncate(1 << 20)
    (tmp_path / "small.xml").write_text(_xml(3, mapped=5))
    subprocess.run(["thin_restore", "-i", str(tmp_path / "small.xml"), "-o", str(small)], check=True,
                   capture_output=True)
    for md in (big_md, str(small)):
        got = [_reader_gone_before(p, md, sigpipe_default=sigpipe_default) for p in ("fast", "click")]
        assert got[0] == got[1] == (1, b""), (md, got)


def test_a_closed_stdout(big_md: str) -> None:
    res = []
    for path in ("fast", "click"):
        p = subprocess.run([THINPOOL, "ls", big_md], env=_env(path), stderr=subprocess.PIPE, timeout=120,
                           stdout=None, preexec_fn=lambda: os.close(1))
        res.append((p.returncode, p.stderr))
    assert res[0] == res[1]
    assert res[0][0] == 0 and b"Traceback" not in res[0][1]


def test_a_full_device_on_stdout(big_md: str) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    res = []
    for path in ("fast", "click"):
        with open("/dev/full", "wb") as full:
            p = subprocess.run([THINPOOL, "ls", big_md], env=_env(path), stdout=full, stderr=subprocess.PIPE,
                               timeout=120)
        res.append((p.returncode, p.stderr))
    assert res[0] == res[1]
    code, err = res[0]
    assert code == 1
    assert err == f"thinpool: error: {os.strerror(errno.ENOSPC)}\n".encode()


# --- damaged metadata: only typed errors -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def listing_md(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[int]]:
    """A metadata file of 300 devices (a details tree and a top level of two levels each), as bytes, and the blocks
    ``ls`` reads (the superblock, the nodes of those two trees), found by reading the tree nodes' pointers."""
    need_tool("thin_restore")
    d = tmp_path_factory.mktemp("r5lsdmg")
    (d / "x.xml").write_text(_xml(300, mapped=4))
    md = d / "metadata"
    with open(md, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["thin_restore", "-i", str(d / "x.xml"), "-o", str(md)], check=True, capture_output=True)
    raw = md.read_bytes()
    sb = raw[:4096]
    mapping_root, details_root = struct.unpack_from("<QQ", sb, 320)
    blocks = [0]
    stack = [mapping_root, details_root]
    while stack:
        b = stack.pop()
        blocks.append(b)
        node = raw[b * 4096:(b + 1) * 4096]
        flags = struct.unpack_from("<I", node, 4)[0]  # node header: csum, flags, blocknr, nr_entries, max_entries
        nr, max_entries = struct.unpack_from("<II", node, 16)
        if flags & 1:  # INTERNAL_NODE
            vals = struct.unpack_from(f"<{nr}Q", node, 32 + 8 * max_entries)
            stack.extend(vals)
    return raw, sorted(set(blocks))


@settings(max_examples=int(os.environ.get("REVIEW5_DAMAGE_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_metadata_gives_a_typed_error_only(listing_md: tuple[bytes, list[int]], tmp_path: Path,
                                                   data: st.DataObject) -> None:
    from thinpool.tools.ls import LS_DEFAULT
    from thinpool_cli.ls_fast import ls_details_text

    raw, blocks = listing_md
    b = data.draw(st.sampled_from(blocks), label="block")
    buf = bytearray(raw)
    block = memoryview(buf)[b * 4096:(b + 1) * 4096]
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        where = data.draw(st.sampled_from(["header", "anywhere", "sb fields", "a value's field", "a value's field"]),
                          label="where")
        if where == "a value's field" and b != 0:  # one of a leaf's values, or a field in one (details: 24 bytes)
            nr, max_entries, value_size = struct.unpack_from("<III", block, 16)
            k = data.draw(st.integers(0, max(0, min(nr, max_entries) - 1)), label="entry")
            off = 32 + 8 * max_entries + value_size * k + data.draw(st.sampled_from([0, 8, 16, 20]), label="field")
        elif where == "header":
            off = data.draw(st.integers(4, 63), label="offset")
        elif where == "sb fields" and b == 0:
            off = data.draw(st.integers(4, 363), label="offset")
        else:
            off = data.draw(st.integers(4, 4095), label="offset")
        width = data.draw(st.sampled_from([1, 4, 8]), label="width")
        off = min(off, 4096 - width)
        value = data.draw(st.sampled_from([0, 1, 2, 0xFF, 0xFFFFFFFF, 2**63, 2**64 - 1, b, b + 1, 252, 253, 126])
                          | st.integers(0, 2**64 - 1), label="value")
        block[off:off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    t = checksum.BlockType.SUPERBLOCK if b == 0 else checksum.BlockType.BTREE_NODE
    stamped = bytearray(block)
    checksum.stamp(stamped, t)
    block[:] = stamped
    md = tmp_path / "damaged"
    md.write_bytes(bytes(buf))
    try:
        for snap in (False, True):
            try:
                ls_details_text(str(md), list(LS_DEFAULT), no_headers=False, metadata_snap=snap, as_json=False)
            except ThinpoolError:
                pass
    finally:
        md.unlink()


def test_a_damaged_mapped_count_lists_as_thin_ls_lists_it(tmp_path: Path) -> None:
    """Found by the test above (review5): a device whose details say 0xFF00000000000000 mapped blocks (metadata
    both thin_checks accept: they do not recount it) made ``thinpool ls`` end in a traceback (IndexError in
    ``disk_unit``: 2^80 bytes is past EiB) on both paths. thin_ls computes the sizes in uint64_t; so does
    ``ls_rows`` now, and the listing is thin_ls's, byte for byte."""
    need_tool("thin_restore", "thin_ls")
    (tmp_path / "x.xml").write_text(_xml(3, mapped=4))
    md = tmp_path / "metadata"
    with open(md, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["thin_restore", "-i", str(tmp_path / "x.xml"), "-o", str(md)], check=True, capture_output=True)
    raw = bytearray(md.read_bytes())
    details_root = struct.unpack_from("<Q", raw, 328)[0]
    leaf = memoryview(raw)[details_root * 4096:(details_root + 1) * 4096]
    flags, = struct.unpack_from("<I", leaf, 4)
    nr, max_entries = struct.unpack_from("<II", leaf, 16)
    assert flags & 2 and nr == 3  # one leaf: dev 0, 1, 2
    struct.pack_into("<Q", leaf, 32 + 8 * max_entries + 24 * 1, 0xFF00000000000000)  # dev 1's mapped_blocks
    stamped = bytearray(leaf)
    checksum.stamp(stamped, checksum.BlockType.BTREE_NODE)
    leaf[:] = stamped
    md.write_bytes(bytes(raw))
    fields = "DEV,MAPPED_BLOCKS,MAPPED_SECTORS,MAPPED_BYTES,MAPPED,TRANSACTION,CREATE_TIME,SNAP_TIME"
    for args in ([], ["-o", fields], ["-o", "DEV,MAPPED,EXCLUSIVE,SHARED_BLOCKS,SHARED_BYTES"]):
        want = subprocess.run(["thin_ls", *args, str(md)], capture_output=True, timeout=60)
        assert want.returncode == 0
        fast, click = _both([*args, str(md)])
        assert fast == click == (0, want.stdout, b""), (args, fast, click, want.stdout)
    # (thin_ls prints a SHARED of 2^64 - 2^18 bytes as "16": its units stop at PiB; here it is "16EiB")
    for args in (["--json"], ["-o", "DEV,SHARED"]):
        fast, click = _both([*args, str(md)])
        assert fast == click and fast[0] == 0 and fast[2] == b"", (args, fast)
