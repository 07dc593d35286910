"""``thinpool ls`` without click (issue 13: ls start-up): the fast path prints exactly what the click path prints.

Both paths run the same command lines (hypothesis over argv built from ``ls_fast.LS_PARAMS``, the one declaration
the click command is built from, plus the error cases) and must give the same stdout, stderr and exit status; a
command line the fast path is not certain of must leave it having done and printed nothing (click then runs). A
fresh interpreter running ``thinpool ls`` must not import click (``sys.modules``, never time).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from thinpool import Pool
from thinpool_cli.ls_fast import LS_PARAMS, run_fast
from thinpool_cli.main import FAST_PATH_ENVVAR, cli, main
from thinpool_cli.params import pool_option


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A pool with devices, snapshots and a held metadata snapshot; one without a snapshot; damaged copies."""
    root = tmp_path_factory.mktemp("lsfast")
    held = root / "held"
    with Pool.create(held, data_size=64 << 20) as p:
        p.create_thin(1, size=16 << 20, name="vol")
        p.device(1).write(0, b"\x11" * (256 << 10))
        p.create_snap(2, 1)
        p.device(2).write(64 << 10, b"\x22" * 4096)
        p.commit()
        p.reserve_metadata_snap()
        p.create_thin(7, size=1 << 20)
        p.device(7).write(0, b"\x77" * 4096)
        p.commit()
    plain = root / "plain"
    with Pool.create(plain, data_size=64 << 20) as p:
        for i in range(5):
            p.create_thin(i, size=8 << 20)
            p.device(i).write(0, b"\x33" * ((i + 1) << 16))
        p.commit()
    out = {"held": held, "plain": plain, "bare": held / "metadata", "missing": root / "missing"}
    # damaged copies: an all-zero superblock, a superblock checksum, a details-tree node, a short file
    for name, damage in (("zeros", "zeros"), ("badsum", "badsum"), ("details", "details"), ("short", "short")):
        d = root / name
        shutil.copytree(plain, d)
        md = d / "metadata"
        with open(md, "r+b") as f:
            if damage == "zeros":
                f.write(bytes(4096))
            elif damage == "badsum":
                f.seek(100)
                f.write(b"\xff")
            elif damage == "details":
                from thinpool.io.block_store import FileBlockStore
                from thinpool.metadata.readonly import read_superblock

                store = FileBlockStore(md, readonly=True)
                root_block = read_superblock(store).device_details_root
                store.close()
                f.seek(root_block * 4096 + 64)
                f.write(b"\xde\xad")
            else:
                f.truncate(1000)
        out[name] = d
    nomd = root / "nomd"
    nomd.mkdir()
    out["nomd"] = nomd
    mddir = root / "mddir"
    (mddir / "metadata").mkdir(parents=True)
    out["mddir"] = mddir
    return out


@contextlib.contextmanager
def captured(env_pool: str | None) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    saved = sys.stdout, sys.stderr, os.environ.get("THINPOOL_POOL")
    out, err = io.StringIO(), io.StringIO()
    if env_pool is None:
        os.environ.pop("THINPOOL_POOL", None)
    else:
        os.environ["THINPOOL_POOL"] = env_pool
    sys.stdout, sys.stderr = out, err
    try:
        yield out, err
    finally:
        sys.stdout, sys.stderr = saved[0], saved[1]
        if saved[2] is None:
            os.environ.pop("THINPOOL_POOL", None)
        else:
            os.environ["THINPOOL_POOL"] = saved[2]


def run_main(argv: list[str], *, fast: bool, env_pool: str | None) -> tuple[str, str, int]:
    with captured(env_pool) as (out, err):
        try:
            main(argv, fast=fast)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        else:
            code = 0
    return out.getvalue(), err.getvalue(), code


def both_paths(args: list[str], env_pool: str | None = None) -> tuple[bool, tuple[str, str, int]]:
    """Run ``thinpool ls ARGS`` on both paths; assert they agree; (whether the fast path took it, the result)."""
    with captured(env_pool) as (out, err):
        took = run_fast(args) is not None
    if not took:
        assert (out.getvalue(), err.getvalue()) == ("", ""), "the fast path printed something, then gave up"
    fast = run_main(["ls", *args], fast=True, env_pool=env_pool)
    slow = run_main(["ls", *args], fast=False, env_pool=env_pool)
    assert fast == slow, f"ls {args}: fast path {fast!r} != click {slow!r}"
    return took, fast


# --- the declaration is the click command's ----------------------------------------------------------------------
def test_the_click_command_is_built_from_the_declaration() -> None:
    cmd = cli.get_command(click.Context(cli), "ls")
    assert cmd is not None
    got = [(p.name, tuple(p.opts), isinstance(p, click.Option) and p.is_flag, p.envvar, p.metavar)
           for p in cmd.params if p.name != "help"]
    want = [(p.dest, p.flags or (p.dest,), p.is_flag, p.envvar, p.metavar if p.flags else p.metavar)
            for p in LS_PARAMS]
    assert got == want


def test_the_pool_option_is_the_other_commands_one() -> None:
    @click.command()
    @pool_option
    def probe(pool_path: str | None) -> None:
        pass

    theirs = probe.params[0]
    ours = next(p for p in cli.get_command(click.Context(cli), "ls").params if p.name == "pool_path")  # type: ignore[union-attr]
    assert isinstance(theirs, click.Option) and isinstance(ours, click.Option)
    assert (ours.opts, ours.secondary_opts, ours.envvar, ours.metavar, ours.help, type(ours.type)) == \
        (theirs.opts, theirs.secondary_opts, theirs.envvar, theirs.metavar, theirs.help, type(theirs.type))
    assert (ours.type.file_okay, ours.type.dir_okay, ours.type.readable, ours.type.exists) == \
        (theirs.type.file_okay, theirs.type.dir_okay, theirs.type.readable, theirs.type.exists)  # type: ignore[attr-defined]


# --- the two paths agree -----------------------------------------------------------------------------------------
TARGETS = ["held", "plain", "bare", "missing", "zeros", "badsum", "details", "short", "nomd", "mddir"]
FIELD_VALUES = ["DEV,MAPPED,CREATE_TIME,SNAP_TIME", "DEV", "dev,mapped", " DEV , TRANSACTION ", "MAPPED_BYTES,DEV",
                "DEV,MAPPED_BLOCKS,MAPPED_SECTORS,MAPPED_BYTES,MAPPED,TRANSACTION,CREATE_TIME,SNAP_TIME",
                "DEV,EXCLUSIVE", "HIGHEST_BLOCK", "BOGUS", "", ",", "DEV,,MAPPED", "-o", "--json"]
ODD_TOKENS = ["-h", "--help", "--bogus", "--", "-", "-mo", "--jso", "--no-header", "--no-headers=1", "--json=",
              "-m=1", "-x", "", "extra"]


@st.composite
def ls_argv(draw: st.DrawFn, pools: dict[str, Path]) -> tuple[list[str], str | None]:
    """A command line made from the declaration: each parameter absent or in one of its forms, in any order,
    sometimes with an odd token; and $THINPOOL_POOL."""
    pieces: list[list[str]] = []
    for p in LS_PARAMS:
        if not draw(st.booleans()):
            continue
        if p.is_argument:
            pieces.append([str(pools[draw(st.sampled_from(TARGETS))])])
            continue
        flag = draw(st.sampled_from(p.flags))
        if p.is_flag:
            pieces.append([flag])
            continue
        value = (str(pools[draw(st.sampled_from(TARGETS))]) if p.path
                 else draw(st.sampled_from(FIELD_VALUES)))
        if flag.startswith("--") and draw(st.booleans()):
            pieces.append([f"{flag}={value}"])
        else:
            pieces.append([flag, value])
    if draw(st.integers(0, 3)) == 0:
        pieces.append([draw(st.sampled_from(ODD_TOKENS))])
    order = draw(st.permutations(range(len(pieces))))
    argv = [t for i in order for t in pieces[i]]
    env = draw(st.one_of(st.none(), st.just(""), st.sampled_from(TARGETS).map(lambda t: str(pools[t]))))
    return argv, env


@given(data=st.data())
def test_both_paths_print_the_same(pools: dict[str, Path], data: st.DataObject) -> None:
    argv, env = data.draw(ls_argv(pools))
    both_paths(argv, env)


@pytest.mark.parametrize("args", [[], ["-o", "DEV,MAPPED_BLOCKS,TRANSACTION"], ["--json"], ["--no-headers"],
                                  ["-m"], ["--metadata-snap", "--json", "--format=DEV,SNAP_TIME"]])
@pytest.mark.parametrize("where", ["held", "bare"])
def test_the_fast_path_takes_the_usual_lines(pools: dict[str, Path], args: list[str], where: str) -> None:
    took, (out, err, code) = both_paths([str(pools[where]), *args])
    assert took and code == 0 and err == "" and out
    took, again = both_paths(args, env_pool=str(pools[where]))  # the pool from $THINPOOL_POOL
    assert took and again == (out, err, code)
    took, again = both_paths(["-p", str(pools[where]), *args])
    assert took and again == (out, err, code)


def test_the_fast_path_lists_what_the_library_lists(pools: dict[str, Path]) -> None:
    from thinpool.metadata.pool_metadata import PoolMetadata
    from thinpool.tools.ls import LS_DEFAULT, ls_rows, ls_text

    took, (out, _, _) = both_paths([str(pools["held"])])
    with Pool.open(pools["held"], readonly=True) as p:
        md = p.md
        assert isinstance(md, PoolMetadata)
        assert out == ls_text(ls_rows(md, LS_DEFAULT), LS_DEFAULT)
    took, (snap_out, _, _) = both_paths([str(pools["held"]), "-m", "--json"])
    assert [r["dev"] for r in json.loads(snap_out)] == [1, 2]  # device 7 came after the snapshot was taken


@pytest.mark.parametrize("where,code", [("missing", 1), ("nomd", 1), ("zeros", 4), ("badsum", 4), ("details", 4),
                                        ("short", 4), ("mddir", 1)])
def test_the_listing_errors_are_the_same_line(pools: dict[str, Path], where: str, code: int) -> None:
    took, (out, err, got) = both_paths([str(pools[where])])
    assert took and got == code and out == ""
    assert err.startswith("thinpool: error: ") and err.count("\n") == 1, err


def test_minus_m_without_a_held_snapshot_is_the_same_error(pools: dict[str, Path]) -> None:
    took, (out, err, code) = both_paths([str(pools["plain"]), "-m"])
    assert took and code == 1 and out == "" and "no metadata snapshot is held" in err


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["-o", "BOGUS"], ["-o", "DEV,EXCLUSIVE"], [],
                                  ["--pool"], ["a", "b"], ["--format=DEV", "--", "x"], ["-mo", "DEV"],
                                  ["--jso"], ["-oDEV"]])
def test_what_the_fast_path_is_not_sure_of_goes_to_click(pools: dict[str, Path], args: list[str]) -> None:
    argv = [str(pools["held"]), *args] if args not in ([], ["a", "b"]) else args
    took, _ = both_paths(argv)
    assert not took


# --- the real entry: no click ------------------------------------------------------------------------------------
PROBE = r"""
import json, sys
sys.argv = ["thinpool"] + json.loads(sys.argv[1])
from thinpool_cli.main import main
try:
    main()
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "click": sorted(m for m in sys.modules if m == "click" or m.startswith("click."))}),
      file=sys.stderr)
"""


def probe(args: list[str], *, click_only: bool = False) -> tuple[str, str, dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if k not in ("THINPOOL_POOL", "THINPOOL_CLICK_ONLY")}
    if click_only:
        env["THINPOOL_CLICK_ONLY"] = "1"
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], env=env, capture_output=True, text=True,
                       timeout=120)
    *lines, last = r.stderr.splitlines()
    return r.stdout, "".join(f"{ln}\n" for ln in lines), json.loads(last)


@pytest.mark.parametrize("where", ["held", "details", "missing"])
def test_thinpool_ls_imports_no_click(pools: dict[str, Path], where: str) -> None:
    out, err, info = probe(["ls", str(pools[where])])
    assert info["click"] == []
    slow_out, slow_err, slow_info = probe(["ls", str(pools[where])], click_only=True)
    assert "click" in slow_info["click"]  # type: ignore[operator]
    assert (out, err, info["code"]) == (slow_out, slow_err, slow_info["code"])


def test_a_usage_error_still_comes_from_click(pools: dict[str, Path]) -> None:
    out, err, info = probe(["ls", str(pools["held"]), "-o", "BOGUS"])
    assert info["code"] == 2 and "Usage: thinpool ls" in err and "click" in info["click"]  # type: ignore[operator]


def test_the_console_script_lists_without_click(pools: dict[str, Path]) -> None:
    # the installed script ends the process at once after the listing (os._exit, no teardown): same bytes, status
    exe = Path(sys.executable).parent / "thinpool"
    if not exe.exists():
        pytest.skip(f"no console script beside {sys.executable}")
    for args in ([str(pools["held"])], [str(pools["held"]), "--json", "-m"], [str(pools["details"])],
                 [str(pools["missing"])], ["-o", "BOGUS", str(pools["held"])]):
        fast = subprocess.run([str(exe), "ls", *args], capture_output=True, text=True, timeout=120)
        slow = subprocess.run([str(exe), "ls", *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "THINPOOL_CLICK_ONLY": "1"})
        assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr)
    odd = os.fsencode(pools["missing"]) + b"-caf\xe9 \xff"  # not UTF-8: printed as Python prints such names
    for args_b in ([odd], [b"-p", odd], [os.fsencode(pools["held"]), b"-o", b"DEV,\xff"]):
        fast_b = subprocess.run([os.fsencode(exe), b"ls", *args_b], capture_output=True, timeout=120)
        slow_b = subprocess.run([os.fsencode(exe), b"ls", *args_b], capture_output=True, timeout=120,
                                env={**os.environ, "THINPOOL_CLICK_ONLY": "1"})
        assert (fast_b.returncode, fast_b.stdout, fast_b.stderr) == (slow_b.returncode, slow_b.stdout, slow_b.stderr)
        assert fast_b.returncode in (1, 2) and fast_b.stderr
    for fd_closed in (1, 2):  # no stdout, or no stderr, at all
        fast_c = subprocess.run([str(exe), "ls", str(pools["missing"] if fd_closed == 2 else pools["held"])],
                                capture_output=True, timeout=120, pass_fds=(), close_fds=True,
                                preexec_fn=lambda fd=fd_closed: os.close(fd))  # noqa: PLW1509
        slow_c = subprocess.run([str(exe), "ls", str(pools["missing"] if fd_closed == 2 else pools["held"])],
                                capture_output=True, timeout=120, preexec_fn=lambda fd=fd_closed: os.close(fd),
                                env={**os.environ, "THINPOOL_CLICK_ONLY": "1"})
        assert (fast_c.returncode, fast_c.stdout, fast_c.stderr) == (slow_c.returncode, slow_c.stdout, slow_c.stderr)
    ok = subprocess.run([str(exe), "ls", str(pools["held"])], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("DEV MAPPED CREATE_TIME SNAP_TIME") and ok.stderr == ""
    with subprocess.Popen([str(exe), "ls", str(pools["held"])], stdout=subprocess.PIPE) as p:  # through a pipe
        assert p.stdout is not None
        assert p.stdout.read().decode() == ok.stdout
    assert p.returncode == 0


def test_the_declaration_module_imports_no_click() -> None:
    r = subprocess.run([sys.executable, "-c", "import sys, thinpool_cli.ls_fast, thinpool_cli.main; "
                        "print('click' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr
    assert FAST_PATH_ENVVAR == "THINPOOL_CLICK_ONLY"


def test_thinpool_ls_imports_neither_dataclasses_nor_inspect(pools: dict[str, Path]) -> None:
    probe_mods = PROBE.replace('m == "click" or m.startswith("click.")', 'm in ("dataclasses", "inspect", "ast")')
    r = subprocess.run([sys.executable, "-c", probe_mods, json.dumps(["ls", str(pools["held"])])],
                       capture_output=True, text=True, timeout=120)
    assert json.loads(r.stderr.splitlines()[-1]) == {"code": 0, "click": []}, r.stderr
    assert r.stdout.startswith("DEV MAPPED CREATE_TIME SNAP_TIME")


# --- the formats' value classes without dataclasses --------------------------------------------------------------
def test_the_format_records_behave_as_frozen_dataclasses() -> None:
    import copy
    import dataclasses
    import pickle

    from thinpool.formats.device_details import DeviceDetails
    from thinpool.formats.fields import record, replace
    from thinpool.formats.space_map import IndexEntry, SmRoot
    from thinpool.formats.superblock import Superblock

    @dataclasses.dataclass(frozen=True, slots=True)
    class Ref:
        a: int
        b: bytes
        c: int = 7

    @record
    class Rec:
        a: int
        b: bytes
        c: int = 7

        @property
        def twice(self) -> int:
            return 2 * self.a

    for args, kw in (((1, b"x"), {}), ((1, b"x", 3), {}), ((), {"b": b"y", "a": 2}), ((4,), {"b": b"", "c": 0})):
        ref, rec = Ref(*args, **kw), Rec(*args, **kw)  # type: ignore[arg-type]
        assert repr(rec).split("(", 1)[1] == repr(ref).split("(", 1)[1]
        assert (rec.a, rec.b, rec.c) == (ref.a, ref.b, ref.c) and rec.twice == 2 * ref.a
        assert rec == Rec(*args, **kw) and hash(rec) == hash(Rec(*args, **kw))  # type: ignore[arg-type]
        assert rec != Rec(rec.a + 1, rec.b, rec.c) and rec != (rec.a, rec.b, rec.c)
        assert copy.copy(rec) == rec and copy.deepcopy(rec) == rec
        assert replace(rec, c=99) == Rec(rec.a, rec.b, 99) and rec.c == ref.c
        with pytest.raises(AttributeError):
            rec.a = 5  # type: ignore[misc]
        with pytest.raises(AttributeError):
            del rec.a  # type: ignore[misc]
        assert not hasattr(rec, "__dict__") and Rec.__match_args__ == Ref.__match_args__
    with pytest.raises(TypeError):
        Rec(1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        replace(Rec(1, b""), d=1)
    for cls in (DeviceDetails, SmRoot, IndexEntry, Superblock):
        assert not dataclasses.is_dataclass(cls) and cls.__slots__  # type: ignore[attr-defined]
    d = DeviceDetails(1, 2, 3, 4)
    assert pickle.loads(pickle.dumps(d)) == d and copy.deepcopy(d) == d and d == DeviceDetails(1, 2, 3, 4)
    sb = Superblock(flags=1, blocknr=0, uuid=bytes(16), magic=27022010, version=2, time=3, trans_id=4, held_root=0,
                    data_sm_root=SmRoot(1, 2, 3, 4), metadata_sm_root=SmRoot(5, 6, 7, 8), data_mapping_root=9,
                    device_details_root=10, data_block_size=128, metadata_block_size=8, metadata_nr_blocks=100)
    assert sb.needs_check and sb.incompat_flags == 0
    assert sb.replace(time=5, held_root=6) == Superblock(**{**{n: getattr(sb, n) for n in Superblock.__match_args__},
                                                           "time": 5, "held_root": 6})
