"""The example's GPT module (``examples/gpt.py``) for the benchmarks: loaded by file path, once per process, since
the examples folder is not a package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLE_GPT = Path(__file__).resolve().parents[1] / "examples" / "gpt.py"
_NAME = "lightning_scaling_example_gpt"


def example_gpt() -> ModuleType:
    """``examples/gpt.py`` as a module (its model, its config and the embedded corpus's data loaders)."""
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    spec = importlib.util.spec_from_file_location(_NAME, EXAMPLE_GPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
