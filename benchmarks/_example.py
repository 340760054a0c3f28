"""The example's GPT module (``examples/gpt.py``) for the benchmarks, loaded by file path once per process since
the examples folder is not a package; and the header of the benchmarks that train it under Lightning."""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

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


def start_lightning_benchmark(script: str, argv: list[str] | None) -> None:
    """What the benchmarks that train the example GPT under Lightning print first, and the noise they silence:
    Lightning's start-up chatter (device lines, no validation loader, few workers, a short run's logging
    interval, torch.func's missing batching rules) is left out; the command and the machine are printed."""
    import lightning as L

    import lightning_scaling

    warnings.filterwarnings(
        "ignore",
        message=r".*(does not have many workers|log_every_n_steps|TPU available|no `val_dataloader`|LeafSpec"
        r"|batching rule for aten::_scaled_dot_product).*",
    )
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    print(f"command: {shlex.join(['python', f'benchmarks/{script}', *(sys.argv[1:] if argv is None else argv)])}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs ({platform.processor() or 'cpu'}); "
        f"torch threads: {torch.get_num_threads()}; python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {L.__version__}, lightning_scaling {lightning_scaling.__version__}; "
        f"date {time.strftime('%Y-%m-%d')}",
        flush=True,
    )
