"""Triton kernels registered as PyTorch ops with FLOP formulas; imported as ``lightning_scaling.kernels``.

Layers, like Liger-Kernel: ``ops/`` holds the raw Triton kernels with their ``torch.library`` op, autograd and
FLOP formula; ``modules.py`` holds the thin ``nn.Module`` drop-ins (``FusedSelfAttention``, ``FusedSwiGLU``,
``FusedLayerNorm``, ``FusedRMSNorm``; the norms also record per-example squared gradient norms).

Which path an op takes: the Triton kernels for CUDA tensors; the PyTorch reference for CPU tensors, unless
``triton_on_cpu()`` is active and ``TRITON_INTERPRET=1`` was set before Triton was imported, in which case the
Triton kernels run on the CPU in Triton's interpreter (slow; for tests only).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

_TRITON_ON_CPU = False


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "on", "yes"}


@contextlib.contextmanager
def triton_on_cpu() -> Iterator[None]:
    """Run the Triton kernels on CPU tensors in Triton's interpreter inside this block (tests only).

    Raises ``RuntimeError`` unless ``TRITON_INTERPRET=1`` is set (it must be set before Triton is imported).
    """
    global _TRITON_ON_CPU
    if not interpreter_enabled():
        raise RuntimeError("triton_on_cpu() needs TRITON_INTERPRET=1 set before triton is first imported")
    previous, _TRITON_ON_CPU = _TRITON_ON_CPU, True
    try:
        yield
    finally:
        _TRITON_ON_CPU = previous


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op given ``tensor`` runs its Triton kernels: fp16/bf16/fp32 on CUDA, or on the CPU under
    ``triton_on_cpu()``. Other dtypes (float64) take the PyTorch path, which computes in their own precision."""
    if tensor.dtype not in TRITON_DTYPES:
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and _TRITON_ON_CPU and interpreter_enabled()


def run_kernels(
    tensor: torch.Tensor, triton_impl: Callable[..., Any], reference_impl: Callable[..., Any], *args: Any
) -> Any:
    """``triton_impl(*args)`` on ``tensor``'s GPU (Triton launches on the current device) when
    ``use_triton(tensor)``, else ``reference_impl(*args)``: the dispatch of every op in ``ops/``."""
    if not use_triton(tensor):
        return reference_impl(*args)
    with torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext():
        return triton_impl(*args)


def __getattr__(name: str) -> Any:  # lazy: importing the package does not import Triton
    if name in {"FusedSelfAttention", "FusedSwiGLU", "FusedLayerNorm", "FusedRMSNorm"}:
        from lightning_scaling.kernels import modules

        return getattr(modules, name)
    if name in {"flash_attention"}:
        from lightning_scaling.kernels.ops import attention

        return getattr(attention, name)
    if name in {"fused_layer_norm", "fused_rms_norm"}:
        from lightning_scaling.kernels.ops import norm

        return getattr(norm, name)
    if name in {"swiglu"}:
        from lightning_scaling.kernels.ops import swiglu

        return getattr(swiglu, name)
    if name in {"swiglu_gate_up"}:
        from lightning_scaling.kernels.ops import swiglu_gemm

        return getattr(swiglu_gemm, name)
    if name in {"swiglu_mlp"}:
        from lightning_scaling.kernels.ops import swiglu_mlp

        return getattr(swiglu_mlp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FusedLayerNorm",
    "FusedRMSNorm",
    "FusedSelfAttention",
    "FusedSwiGLU",
    "flash_attention",
    "fused_layer_norm",
    "fused_rms_norm",
    "interpreter_enabled",
    "swiglu",
    "swiglu_gate_up",
    "swiglu_mlp",
    "triton_on_cpu",
    "use_triton",
]
