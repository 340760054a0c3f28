"""FLOPs of a training run: the analytic transformer formulas (:mod:`.formulas`), the counter that measures a
real forward and backward (:mod:`.counter`, torch), FLOPs of unmeasured batch shapes from measured ones
(:mod:`.by_shape`), a model's shape read from its config (:mod:`.model_shape`) and the devices' dense peaks
(:mod:`.hardware`).

Imports from here: the formulas and the peaks are pure; the counter's names load torch when first used.
May import: :mod:`lightning_scaling.argument_checks`; never the callbacks, Lightning or Triton.
"""

from __future__ import annotations

from lightning_scaling.flops.formulas import (
    CAUSAL_ATTENTION_CONVENTIONS,
    DEFAULT_CAUSAL_ATTENTION,
    FLOP_CONVENTIONS,
    ParamCount,
    TransformerFlops,
    attention_flops,
    causal_attention_factor,
    transformer_flops,
    transformer_params,
)
from lightning_scaling.flops.hardware import DENSE_PEAK_FLOPS, dense_peak_flops, device_peak_flops
from lightning_scaling.lazy_imports import module_getattr

_LAZY = {
    "MeasuredFlops": ".counter",
    "TrainingFlopCounter": ".counter",
    "count_parameters": ".counter",
    "measure_training_flops": ".counter",
    "register_flop_formula": ".counter",
    "registered_flop_formulas": ".counter",
    "training_flop_counter": ".counter",
    "FlopsByShape": ".by_shape",
    "ModelShape": ".model_shape",
    "find_model_shape": ".model_shape",
}

# the eager names as a literal, so that linters and type checkers see them re-exported; then the lazy ones
__all__ = [
    "CAUSAL_ATTENTION_CONVENTIONS",
    "DEFAULT_CAUSAL_ATTENTION",
    "DENSE_PEAK_FLOPS",
    "FLOP_CONVENTIONS",
    "ParamCount",
    "TransformerFlops",
    "attention_flops",
    "causal_attention_factor",
    "dense_peak_flops",
    "device_peak_flops",
    "transformer_flops",
    "transformer_params",
]
__all__ += sorted(_LAZY)


__getattr__ = module_getattr(__name__, _LAZY)
