"""Fixtures of the benchmark-script tests: the scripts under benchmarks/, loaded as modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gc() -> ModuleType:
    """benchmarks/gpu_check.py."""
    return _load("gpu_check_under_test", BENCHMARKS / "gpu_check.py")


@pytest.fixture(scope="module")
def mfu() -> ModuleType:
    """benchmarks/gpu_mfu.py."""
    return _load("gpu_mfu_under_test", BENCHMARKS / "gpu_mfu.py")
