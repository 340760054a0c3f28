"""lightning-scaling: keep a Lightning training run compute-optimal.

The pure math (``laws``, ``flops``' formulas, ``estimators.noise_scale``, ``planner``, ``run_report``) imports
neither Lightning nor Triton; the callbacks import Lightning when first used. Names below load lazily so
``import lightning_scaling`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from lightning_scaling import _source_tree
from lightning_scaling.lazy_imports import module_getattr

_source_tree.install(Path(__file__).resolve().parent)  # lightning_scaling.kernels from a source checkout too

__version__ = "0.1.0"


class ScalingWarning(UserWarning):
    """The category of every warning the lightning-scaling callbacks give, so that they can be filtered as one::

        warnings.filterwarnings("ignore", category=lightning_scaling.ScalingWarning)

    Each says what it saw and what to do, once per run, on rank zero, and points at no file of ours (its
    location reads ``lightning_scaling:0``)."""


_LAZY = {
    # laws
    "ChinchillaLaw": "lightning_scaling.laws",
    "KaplanLaw": "lightning_scaling.laws",
    "DataConstrainedLaw": "lightning_scaling.laws",
    "Allocation": "lightning_scaling.laws",
    "HOFFMANN_2022": "lightning_scaling.laws",
    "BESIROGLU_2024": "lightning_scaling.laws",
    "MUENNIGHOFF_2023": "lightning_scaling.laws",
    "inference_optimal": "lightning_scaling.laws",
    "DEFAULT_LAW": "lightning_scaling.laws",
    "get_law": "lightning_scaling.laws",
    "load_law": "lightning_scaling.laws",
    "plan": "lightning_scaling.planner",
    # analytic FLOPs
    "transformer_flops": "lightning_scaling.flops",
    "transformer_params": "lightning_scaling.flops",
    "attention_flops": "lightning_scaling.flops",
    "count_parameters": "lightning_scaling.flops",
    "measure_training_flops": "lightning_scaling.flops",
    "register_flop_formula": "lightning_scaling.flops",
    # callbacks
    "FlopCounter": "lightning_scaling.callbacks",
    "TokenBudget": "lightning_scaling.callbacks",
    "GradientNoiseScale": "lightning_scaling.callbacks",
    "DataRepetition": "lightning_scaling.callbacks",
    "ScalingMonitor": "lightning_scaling.callbacks",
    "BatchSizeSchedule": "lightning_scaling.callbacks",
}

__all__ = ["ScalingWarning", "__version__", *sorted(_LAZY)]


__getattr__ = module_getattr(__name__, _LAZY)
