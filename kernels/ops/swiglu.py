"""Fused SwiGLU gate: ``silu(gate) * up`` as one Triton kernel forward and one backward, a ``torch.library`` op
(autograd, fake tensors, CPU reference path).

This op keeps only its inputs ``gate`` and ``up`` and recomputes ``sigmoid(gate)`` in the backward, where eager
PyTorch also keeps ``silu(gate)``. Used between two ``nn.Linear`` layers, the MLP then keeps three [tokens, d_ff]
tensors where eager keeps four (the product is kept by the ``down`` projection). ``ops/swiglu_mlp.py`` uses the
same kernels for the whole MLP and keeps two; ``ops/swiglu_gemm.py`` fuses the gate/up GEMM and keeps one.

FLOPs: the op is elementwise and contains no matmul, so it has no FLOP formula (it counts 0, like torch's
own ``silu`` and ``mul``); ``FlopCounterMode`` already counts the ``nn.Linear`` GEMMs around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lightning_scaling.kernels import interpreter_enabled, run_kernels
from lightning_scaling.kernels.ops._inputs import check_float_tensor, reference_dtype

_BLOCK_SIZE = 256 if interpreter_enabled() else 1024


# ----------------------------------------------------------------------------------------------------------
# Forward: h = silu(g) * u = g * sigmoid(g) * u, computed in fp32, one program per BLOCK_SIZE elements.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _swiglu_fwd_kernel(G, U, H, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # 64-bit: > 2**31 elements
    mask = offs < n_elements
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Backward, recomputing sigmoid(g):  dU = dH * silu(g);  dG = dH * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
# With STORE_H it also writes the product h = silu(g) * u again, for a caller that did not keep it
# (ops/swiglu_mlp.py: the down projection's weight gradient).
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _swiglu_bwd_kernel(DH, G, U, DG, DU, H, n_elements, STORE_H: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # 64-bit: > 2**31 elements
    mask = offs < n_elements
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    du = dh * silu
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(H + offs, (silu * u).to(H.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers and the PyTorch reference (CPU path)
# ----------------------------------------------------------------------------------------------------------
def _triton_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK_SIZE),)](gate, up, out, n, BLOCK_SIZE=_BLOCK_SIZE)
    return out


def _triton_backward(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, with_product: bool = False
) -> tuple[torch.Tensor, ...]:
    """(d_gate, d_up), and the product ``silu(gate) * up`` as a third tensor when ``with_product``."""
    grad_out, gate, up = grad_out.contiguous(), gate.contiguous(), up.contiguous()
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    product = torch.empty_like(gate) if with_product else d_gate  # not written unless asked for
    n = gate.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK_SIZE),)](
        grad_out, gate, up, d_gate, d_up, product, n, STORE_H=with_product, BLOCK_SIZE=_BLOCK_SIZE
    )
    return (d_gate, d_up, product) if with_product else (d_gate, d_up)


def _reference_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    ct = reference_dtype(gate.dtype)
    return (F.silu(gate.to(ct)) * up.to(ct)).to(gate.dtype)


def _reference_backward(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, with_product: bool = False
) -> tuple[torch.Tensor, ...]:
    ct = reference_dtype(gate.dtype)
    dh, g, u = grad_out.to(ct), gate.to(ct), up.to(ct)
    sig = torch.sigmoid(g)
    d_gate = dh * u * sig * (1 + g * (1 - sig))  # d silu(g)/dg = sigmoid(g)·(1 + g·(1 − sigmoid(g)))
    grads = (d_gate.to(gate.dtype), (dh * g * sig).to(up.dtype))
    return (*grads, (g * sig * u).to(gate.dtype)) if with_product else grads


# ----------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("lightning_scaling::swiglu_forward", mutates_args=())
def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, same shape and dtype as ``gate``."""
    return run_kernels(gate, _triton_forward, _reference_forward, gate, up)


@swiglu_forward.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("lightning_scaling::swiglu_backward", mutates_args=())
def swiglu_backward(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (d_gate, d_up) of ``swiglu_forward``, recomputing ``sigmoid(gate)``."""
    return run_kernels(gate, _triton_backward, _reference_backward, grad_out, gate, up)


@swiglu_backward.register_fake
def _(grad_out, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output) -> None:
    gate, up = inputs
    ctx.save_for_backward(gate, up)  # not silu(gate), not the product: recomputed in the backward


def _backward(ctx, grad_out: torch.Tensor):
    gate, up = ctx.saved_tensors
    return swiglu_backward(grad_out, gate, up)


swiglu_forward.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` fused (differentiable). ``gate`` and ``up``: same shape, dtype and device.

    On CUDA (and on the CPU under ``triton_on_cpu()``) runs the Triton kernels; otherwise the PyTorch reference.
    """
    for name, t in (("gate", gate), ("up", up)):
        check_float_tensor(name, t)
    if up.shape != gate.shape:
        raise ValueError(f"up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise ValueError(f"up must have the dtype of gate ({gate.dtype}), got {up.dtype}")
    if up.device != gate.device:
        raise ValueError(f"up must be on the device of gate ({gate.device}), got {up.device}")
    return swiglu_forward(gate, up)
