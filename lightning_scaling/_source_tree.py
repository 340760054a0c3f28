"""``lightning_scaling.kernels`` from a source checkout.

An install maps the repository's top-level ``kernels/`` folder to ``lightning_scaling.kernels`` (pyproject's
``package-dir``). Run from the repository root (``python -m pytest tests``, a Python prompt, an example), the
source folder ``lightning_scaling/`` shadows the install and has no ``kernels`` inside: this finder resolves
``lightning_scaling.kernels`` (and its submodules, through the package's search path) to the same top-level folder.
It never creates a top-level ``kernels`` module, so it cannot collide with the unrelated ``kernels`` package on
PyPI, and it imports nothing until ``lightning_scaling.kernels`` is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_NAME = "lightning_scaling.kernels"


class _SourceKernelsFinder(importlib.abc.MetaPathFinder):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _NAME:
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)]
        )


def install(package_dir: Path) -> None:
    """Register the finder when ``package_dir`` (``lightning_scaling/``) is a source checkout's folder."""
    if (package_dir / "kernels").is_dir():
        return  # an install: the kernels are inside the package
    folder = package_dir.parent / "kernels"
    if not (folder / "__init__.py").is_file() or not (package_dir.parent / "pyproject.toml").is_file():
        return
    if not any(isinstance(f, _SourceKernelsFinder) for f in sys.meta_path):
        sys.meta_path.append(_SourceKernelsFinder(folder))
