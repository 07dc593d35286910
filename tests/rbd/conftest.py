"""Fixtures of the RBD tests: one throw-away Ceph cluster per session, a fresh RBD image name per test.

pytest imports every conftest.py of this rootdir (no __init__.py files) as the module ``conftest``; this one would
shadow tests/conftest.py for ``from conftest import ...`` in modules collected later, so it re-exports the root
helpers unchanged, loaded from their file (as tests/metadata/conftest.py does).
"""

from __future__ import annotations

import importlib.util
import itertools
import shutil
import tempfile
from pathlib import Path

import pytest
from rbd_cluster import CephCluster

_root = Path(__file__).resolve().parent.parent / "conftest.py"
_spec = importlib.util.spec_from_file_location("_thinpool_tests_root_conftest_rbd", _root)
assert _spec is not None and _spec.loader is not None
_root_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root_mod)

REPO = _root_mod.REPO
IMAGES = _root_mod.IMAGES
REQUIRE_EXTERNAL = _root_mod.REQUIRE_EXTERNAL
need_tool = _root_mod.need_tool
need_root_feature = _root_mod.need_root_feature
run_tool = _root_mod.run_tool

_names = itertools.count(1)


@pytest.fixture(scope="session")
def ceph_cluster():
    """A one-node cluster (mon + memstore OSD) on 127.0.0.1, started once and stopped by pid at the end.

    Skips with the missing program's name outside CI; CI (THINPOOL_REQUIRE_EXTERNAL=1) fails instead."""
    need_tool("ceph-mon", "ceph-osd", "monmaptool", "ceph", "rbd")
    root = Path(tempfile.mkdtemp(prefix="thinpool-ceph-"))
    cluster = CephCluster(root)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        log = root / "log"
        tail = ""
        for f in sorted(log.glob("*.log")) if log.exists() else []:
            tail += f"--- {f.name}\n" + f.read_text(errors="replace")[-3000:]
        shutil.rmtree(root, ignore_errors=True)
        raise AssertionError("could not start the Ceph test cluster\n" + tail) from None
    yield cluster
    rss = cluster.daemon_rss()
    print("\nceph test cluster RSS at the end:", ", ".join(f"{k} {v >> 20} MiB" for k, v in sorted(rss.items())))
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ceph(ceph_cluster):
    return ceph_cluster


@pytest.fixture
def image_name():
    """A fresh RBD image name (rbd/<name>) per test."""
    return f"img{next(_names)}"
