"""tests/metadata: the --runslow option (tests marked ``slow`` are skipped without it).

``python -m pytest tests/metadata --runslow`` runs them; from the repository root (where this conftest is not
loaded before option parsing) use ``THINPOOL_RUNSLOW=1 python -m pytest``.

pytest imports every conftest.py of a rootdir without __init__.py files as the module ``conftest``; this one is
imported after ``tests/conftest.py`` and would shadow it for ``from conftest import ...`` in any test module
collected later, so it re-exports the root helpers unchanged (loaded from their file, not copied).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

_root = Path(__file__).resolve().parent.parent / "conftest.py"
_spec = importlib.util.spec_from_file_location("_thinpool_tests_root_conftest", _root)
assert _spec is not None and _spec.loader is not None
_root_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root_mod)

REPO = _root_mod.REPO
IMAGES = _root_mod.IMAGES
REQUIRE_EXTERNAL = _root_mod.REQUIRE_EXTERNAL
need_tool = _root_mod.need_tool
need_root_feature = _root_mod.need_root_feature
run_tool = _root_mod.run_tool


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        runslow = config.getoption("--runslow")
    except ValueError:
        runslow = False
    if runslow or os.environ.get("THINPOOL_RUNSLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    here = Path(__file__).resolve().parent
    for item in items:
        if "slow" in item.keywords and here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
