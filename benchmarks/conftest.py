"""Benchmarks are outside testpaths: run them with `python -m pytest benchmarks --benchmark-only`.

Skips the whole folder cleanly where pytest-benchmark is not installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

if importlib.util.find_spec("pytest_benchmark") is None:
    collect_ignore_glob = ["test_*.py"]

    def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
        print("pytest-benchmark is not installed: benchmarks skipped", file=sys.stderr)
