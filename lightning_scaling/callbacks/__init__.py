"""Lightning callbacks: FLOPs and MFU, tokens per parameter, gradient noise scale, data repetition."""

from __future__ import annotations

from lightning_scaling.lazy_imports import module_getattr

_LAZY = {
    "FlopCounter": "lightning_scaling.callbacks.flop_counter",
    "TokenBudget": "lightning_scaling.callbacks.token_budget",
    "GradientNoiseScale": "lightning_scaling.callbacks.gradient_noise_scale",
    "DataRepetition": "lightning_scaling.callbacks.data_repetition",
    "ScalingMonitor": "lightning_scaling.callbacks.scaling_monitor",
    "BatchSizeSchedule": "lightning_scaling.callbacks.batch_size_schedule",
    "non_padding_tokens": "lightning_scaling.callbacks._common",
    "ScalingWarning": "lightning_scaling",
}

__all__ = sorted(_LAZY)


__getattr__ = module_getattr(__name__, _LAZY)
