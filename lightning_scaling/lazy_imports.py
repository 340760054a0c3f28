"""Names that a package re-exports but imports only when first used, so that importing the package stays cheap
(``lightning-scaling plan`` never loads torch). Pure: imports only ``importlib``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def module_getattr(package: str, modules: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``name`` in ``modules`` is imported from the module
    ``modules[name]`` (a path relative to ``package`` when it starts with a dot) on first use; any other name is
    an ``AttributeError``, as Python's own lookup would raise."""

    def __getattr__(name: str) -> Any:
        if name in modules:
            return getattr(importlib.import_module(modules[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
