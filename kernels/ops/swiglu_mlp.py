"""The whole SwiGLU MLP ``down(silu(x W_gateᵀ) ⊙ (x W_upᵀ))`` as one ``torch.library`` op (autograd, fake tensors,
CPU reference path, FLOP formulas): cuBLAS for the three GEMMs, the Triton SwiGLU kernels of ``ops/swiglu.py``
for the gate.

Memory: eager PyTorch keeps four [tokens, d_ff] tensors for the backward (``g = gate(x)``, ``silu(g)``,
``u = up(x)`` and the product ``h``, the last for ``down``'s weight gradient). This op keeps ``g`` and ``u``
only: its backward's SwiGLU kernel recomputes ``silu(g)`` and writes ``h`` again for ``down``'s weight gradient,
one more [tokens, d_ff] write and no extra FLOPs. Two of four: 0.5 x.

Shapes: ``x`` [M tokens, d_model]; ``w_gate``, ``w_up`` [d_ff, d_model]; ``w_down`` [d_model, d_ff]
(``nn.Linear`` layouts); output [M, d_model]. FLOPs (model FLOPs, docs/math.md §1, Hoffmann 2022 App. F, gated
dense block): forward 3 GEMMs of 2·M·d_model·d_ff; backward 2 × forward.
"""

from __future__ import annotations

import torch

from lightning_scaling.flops.counter import register_flop_formula
from lightning_scaling.kernels import run_kernels
from lightning_scaling.kernels.ops import swiglu as gate_kernels
from lightning_scaling.kernels.ops._inputs import autocast_like_linear, check_2d, check_gate_up_inputs


# ----------------------------------------------------------------------------------------------------------
# Forward and backward bodies: cuBLAS GEMMs on every device; the SwiGLU gate through run_kernels (Triton where
# use_triton() says so, the PyTorch reference elsewhere).
# ----------------------------------------------------------------------------------------------------------
def _forward(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, u = x @ w_gate.t(), x @ w_up.t()
    h = run_kernels(g, gate_kernels._triton_forward, gate_kernels._reference_forward, g, u)
    return h @ w_down.t(), g, u  # the product is freed on return


def _backward(
    grad_y: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
    g: torch.Tensor, u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d_gate, d_up, h = run_kernels(
        g, gate_kernels._triton_backward, gate_kernels._reference_backward, grad_y @ w_down, g, u, True
    )  # True: write the product h again
    grad_w_down = grad_y.t() @ h
    del h
    grad_x = (d_gate @ w_gate).addmm_(d_up, w_up)
    return grad_x, d_gate.t() @ x, d_up.t() @ x, grad_w_down


# ----------------------------------------------------------------------------------------------------------
# torch.library ops: the forward also returns g and u, which the backward needs (marked non-differentiable).
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("lightning_scaling::swiglu_mlp_forward", mutates_args=())
def swiglu_mlp_forward(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output [M, d_model], gate(x) [M, d_ff], up(x) [M, d_ff]), all in the dtype of x (x is 2-D)."""
    check_2d(x)
    return _forward(x, w_gate, w_up, w_down)


@swiglu_mlp_forward.register_fake
def _(x, w_gate, w_up, w_down):
    check_2d(x)
    m, d_ff = x.shape[0], w_gate.shape[0]
    return x.new_empty((m, w_down.shape[0])), x.new_empty((m, d_ff)), x.new_empty((m, d_ff))


@torch.library.custom_op("lightning_scaling::swiglu_mlp_backward", mutates_args=())
def swiglu_mlp_backward(
    grad_y: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
    g: torch.Tensor, u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (d_x, d_w_gate, d_w_up, d_w_down) of ``swiglu_mlp_forward``, recomputing the product."""
    return _backward(grad_y, x, w_gate, w_up, w_down, g, u)


@swiglu_mlp_backward.register_fake
def _(grad_y, x, w_gate, w_up, w_down, g, u):
    return (
        x.new_empty(x.shape),
        w_gate.new_empty(w_gate.shape),
        w_up.new_empty(w_up.shape),
        w_down.new_empty(w_down.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    _, g, u = output
    ctx.save_for_backward(*inputs, g, u)  # x, the weights, g and u: not silu(g), not the product
    ctx.mark_non_differentiable(g, u)
    ctx.set_materialize_grads(False)  # g and u get no gradient: no [tokens, d_ff] zeros for them at the peak


def _autograd_backward(ctx, grad_y: torch.Tensor | None, grad_g: torch.Tensor | None, grad_u: torch.Tensor | None):
    if grad_y is None:
        return None, None, None, None
    return swiglu_mlp_backward(grad_y.contiguous(), *ctx.saved_tensors)


swiglu_mlp_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# FLOP formulas (model FLOPs; shapes in, as torch's counter passes them)
# ----------------------------------------------------------------------------------------------------------
def _forward_flops(x, w_gate, w_up, w_down, *, out_shape=None, **_: object) -> int:
    """FLOPs of one forward call: gate, up and down GEMMs, 2·M·d_model·d_ff each (docs/math.md §1, Hoffmann 2022
    App. F gated dense block). The elementwise gate is not counted, as torch counts no activation."""
    (m, d_model), d_ff = x, w_gate[0]
    return 3 * 2 * m * d_model * d_ff


def _backward_flops(grad_y, x, w_gate, w_up, w_down, g, u, *, out_shape=None, **_: object) -> int:
    """FLOPs of one backward call: 2 × forward (input and weight gradients of the three GEMMs)."""
    return 2 * _forward_flops(x, w_gate, w_up, w_down)


register_flop_formula(torch.ops.lightning_scaling.swiglu_mlp_forward, _forward_flops)
register_flop_formula(torch.ops.lightning_scaling.swiglu_mlp_backward, _backward_flops)


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------
def swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """``down(silu(x @ w_gate.T) * (x @ w_up.T))`` keeping two [tokens, d_ff] tensors for backward, not four.

    ``x`` [..., d_model]; ``w_gate``, ``w_up`` [d_ff, d_model]; ``w_down`` [d_model, d_ff] (``nn.Linear.weight``),
    one dtype and device. Returns [..., d_model]. Under ``torch.autocast`` the four are cast to the autocast dtype
    first, as ``F.linear`` would be.
    """
    x, w_gate, w_up, w_down = autocast_like_linear(x, w_gate, w_up, w_down)
    check_gate_up_inputs(x, w_gate, w_up, extra={"w_down": w_down})
    if w_down.shape != (w_gate.shape[1], w_gate.shape[0]):
        raise ValueError(
            f"w_down must be [d_model={w_gate.shape[1]}, d_ff={w_gate.shape[0]}], got {tuple(w_down.shape)}"
        )
    lead = x.shape[:-1]
    y, _, _ = swiglu_mlp_forward(x.reshape(-1, x.shape[-1]), w_gate, w_up, w_down)
    return y.view(*lead, w_down.shape[0])
