"""Fused gate/up GEMM with the SwiGLU epilogue: ``h = silu(x W_gateᵀ) ⊙ (x W_upᵀ)`` as one Triton matmul whose
tiles never leave registers until the product is written; a ``torch.library`` op (autograd, fake tensors, CPU
reference path) with FLOP formulas.

Memory: the forward writes only ``h``. The backward recomputes the two GEMM tiles from ``x`` and the weights
and applies the SwiGLU gradient in the same kernel's epilogue, so ``gate(x)``, ``up(x)`` and ``silu(gate(x))``
are never kept: of eager PyTorch's four saved [tokens, d_ff] tensors, the MLP keeps one (``h``, saved by the
``down`` projection): 0.25 x. The price is the recomputed gate/up GEMM in the backward, 4·M·N·K more hardware
FLOPs (a third more than the gate/up GEMMs' own forward+backward); whether that pays against the elementwise
fusion (``ops/swiglu.py``) is measured by ``benchmarks/mlp.py``.

Shapes: ``x`` [M tokens, K = d_model]; ``w_gate``, ``w_up`` [N = d_ff, K] (``nn.Linear`` layout); ``h`` [M, N].
FLOPs (model FLOPs, docs/math.md §1, Hoffmann 2022 App. F): forward 2 GEMMs of 2·M·N·K; backward 2 × forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lightning_scaling.flops.counter import register_flop_formula
from lightning_scaling.kernels import interpreter_enabled, run_kernels
from lightning_scaling.kernels.ops._inputs import autocast_like_linear, check_2d, check_gate_up_inputs, reference_dtype


# ----------------------------------------------------------------------------------------------------------
# Block sizes. The interpreter gets one small config (it cannot autotune, and each program instance costs
# ~1 ms); on a GPU the autotuner picks per (M, N, K). Two fp32 accumulators per tile: BLOCK_M x BLOCK_N is
# held twice, so the tiles are half the area a plain matmul would use at the same register budget. Each list
# was checked by compiling for the H100 (sm_90) with benchmarks/kernel_resources.py: no spills, shared memory
# within 227 KiB, dots on HGMMA. The backward's epilogue holds dH too, so its largest tiles spill and are left out.
# ----------------------------------------------------------------------------------------------------------
def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for fp16/bf16 inputs, and smaller ones for fp32 inputs (exact
# fp32 dots on the FMA units need far more registers); the pruner hands the autotuner the list for the dtype.
_Tile = tuple[int, int, int, int, int]
_FWD_TILES: dict[int, list[_Tile]] = {
    16: [
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (128, 64, 64, 8, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 8, 4),
        (64, 64, 64, 4, 4),
    ],
    32: [(64, 64, 32, 8, 2), (64, 32, 32, 4, 2), (32, 64, 32, 4, 2)],
}
_BWD_TILES: dict[int, list[_Tile]] = {
    16: [(128, 64, 64, 8, 4), (64, 128, 64, 4, 4), (64, 128, 64, 8, 3), (128, 64, 32, 8, 4), (64, 64, 64, 4, 4)],
    32: _FWD_TILES[32],
}


def _pruner(tiles: dict[int, list[_Tile]]):
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        if interpreter_enabled():
            return configs
        wanted = set(tiles[32 if named_args["X"].dtype == torch.float32 else 16])
        return [
            c
            for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in wanted
        ]

    return prune


_FWD_CONFIGS = _configs([t for ts in _FWD_TILES.values() for t in ts])
_BWD_CONFIGS = _configs(list(dict.fromkeys(t for ts in _BWD_TILES.values() for t in ts)))
_KEY = ["M", "N", "K", "DOT_PRECISION"]
_HEURISTICS = {"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0}


@triton.jit
def _tile_indices(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped launch order (Triton's matmul tutorial): GROUP_M consecutive row blocks walk the same weight
    # columns, so the weight tiles are reused from L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _gate_up_tiles(
    X, WG, WU, offs_m, offs_n, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # g = x W_gateᵀ and u = x W_upᵀ for one [BLOCK_M, BLOCK_N] tile, fp32 accumulators. Out-of-range rows and
    # columns wrap around (modulo) instead of being masked: they compute garbage that is never stored.
    rows = (offs_m % M).to(tl.int64)  # 64-bit offsets: tokens x d_model may pass 2**31 elements
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    wg_ptrs = WG + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N] = W_gateᵀ tile
    wu_ptrs = WU + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            wg = tl.load(wg_ptrs)
            wu = tl.load(wu_ptrs)
        else:
            k_left = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            wg = tl.load(wg_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            wu = tl.load(wu_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc_g = tl.dot(x, wg, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(x, wu, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    return acc_g, acc_u


# ----------------------------------------------------------------------------------------------------------
# Forward: one program per [BLOCK_M, BLOCK_N] tile of h; the epilogue h = silu(g) * u runs on the accumulators.
# ----------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _pruner(_FWD_TILES)})
@triton.heuristics(_HEURISTICS)
@triton.jit
def _gate_up_swiglu_fwd_kernel(
    X, WG, WU, H, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hn, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, offs_n = _tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    g, u = _gate_up_tiles(
        X, WG, WU, offs_m, offs_n, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, EVEN_K, DOT_PRECISION, BLOCK_M,
        BLOCK_N, BLOCK_K,
    )
    h = g * tl.sigmoid(g) * u
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(
        H + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :] * stride_hn, h.to(H.dtype.element_ty), mask=mask
    )


# ----------------------------------------------------------------------------------------------------------
# Backward: recompute the g and u tiles, then the SwiGLU gradient in the epilogue:
#   dU = dH * silu(g);  dG = dH * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
# ----------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_BWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _pruner(_BWD_TILES)})
@triton.heuristics(_HEURISTICS)
@triton.jit
def _gate_up_swiglu_bwd_kernel(
    X, WG, WU, DH, DG, DU, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hn,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n = _tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    g, u = _gate_up_tiles(
        X, WG, WU, offs_m, offs_n, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, EVEN_K, DOT_PRECISION, BLOCK_M,
        BLOCK_N, BLOCK_K,
    )
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tile = offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :] * stride_hn  # DH, DG, DU: one layout
    dh = tl.load(DH + tile, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    du = dh * g * sig
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + tile, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + tile, du.to(DU.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (no TF32), so fp32 results match PyTorch's default fp32 matmul.
    return "ieee" if dtype == torch.float32 else "tf32"


def _grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def _triton_forward(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    w_gate, w_up = w_gate.contiguous(), w_up.contiguous()
    (m, k), n = x.shape, w_gate.shape[0]
    h = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gate_up_swiglu_fwd_kernel[_grid(m, n)](
        x, w_gate, w_up, h, m, n, k, *x.stride(), *w_gate.stride(), *h.stride(), DOT_PRECISION=_dot_precision(x.dtype)
    )
    return h


def _triton_gate_up_grads(
    grad_h: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    w_gate, w_up, grad_h = w_gate.contiguous(), w_up.contiguous(), grad_h.contiguous()
    (m, k), n = x.shape, w_gate.shape[0]
    d_gate, d_up = torch.empty_like(grad_h), torch.empty_like(grad_h)
    _gate_up_swiglu_bwd_kernel[_grid(m, n)](
        x, w_gate, w_up, grad_h, d_gate, d_up, m, n, k, *x.stride(), *w_gate.stride(), *grad_h.stride(),
        DOT_PRECISION=_dot_precision(x.dtype),
    )
    return d_gate, d_up


def _triton_backward(
    grad_h: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d_gate, d_up = _triton_gate_up_grads(grad_h, x, w_gate, w_up)
    # The four GEMMs of the gate/up backward (cuBLAS): d_gate and d_up are transient, freed on return.
    grad_x = (d_gate @ w_gate).addmm_(d_up, w_up)
    return grad_x, d_gate.t() @ x, d_up.t() @ x


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference (the CPU path), in fp32 or wider.
# ----------------------------------------------------------------------------------------------------------
def _reference_forward(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    ct = reference_dtype(x.dtype)
    x32 = x.to(ct)
    return (F.silu(x32 @ w_gate.to(ct).t()) * (x32 @ w_up.to(ct).t())).to(x.dtype)


def _reference_backward(
    grad_h: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ct = reference_dtype(x.dtype)
    x32, wg32, wu32, dh = x.to(ct), w_gate.to(ct), w_up.to(ct), grad_h.to(ct)
    g, u = x32 @ wg32.t(), x32 @ wu32.t()  # recomputed, as the Triton backward does
    sig = torch.sigmoid(g)
    d_up = dh * g * sig
    d_gate = dh * u * sig * (1 + g * (1 - sig))  # d silu(g)/dg = sigmoid(g)·(1 + g·(1 − sigmoid(g)))
    grad_x = d_gate @ wg32 + d_up @ wu32
    return grad_x.to(x.dtype), (d_gate.t() @ x32).to(w_gate.dtype), (d_up.t() @ x32).to(w_up.dtype)


# ----------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("lightning_scaling::swiglu_gate_up_forward", mutates_args=())
def swiglu_gate_up_forward(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """``silu(x @ w_gate.T) * (x @ w_up.T)``: x [M, K], weights [N, K] -> [M, N] in the dtype of x."""
    check_2d(x)
    return run_kernels(x, _triton_forward, _reference_forward, x, w_gate, w_up)


@swiglu_gate_up_forward.register_fake
def _(x, w_gate, w_up):
    check_2d(x)
    return x.new_empty((x.shape[0], w_gate.shape[0]))


@torch.library.custom_op("lightning_scaling::swiglu_gate_up_backward", mutates_args=())
def swiglu_gate_up_backward(
    grad_h: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (d_x, d_w_gate, d_w_up) of ``swiglu_gate_up_forward``, recomputing the gate/up GEMMs."""
    return run_kernels(x, _triton_backward, _reference_backward, grad_h, x, w_gate, w_up)


@swiglu_gate_up_backward.register_fake
def _(grad_h, x, w_gate, w_up):
    return x.new_empty(x.shape), w_gate.new_empty(w_gate.shape), w_up.new_empty(w_up.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, w_gate, w_up = inputs
    ctx.save_for_backward(x, w_gate, w_up)  # no [M, N] tensor: both GEMMs are recomputed in the backward


def _backward(ctx, grad_h: torch.Tensor):
    x, w_gate, w_up = ctx.saved_tensors
    return swiglu_gate_up_backward(grad_h.contiguous(), x, w_gate, w_up)


swiglu_gate_up_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# FLOP formulas (model FLOPs; shapes in, as torch's counter passes them)
# ----------------------------------------------------------------------------------------------------------
def _forward_flops(x, w_gate, w_up, *, out_shape=None, **_: object) -> int:
    """FLOPs of one forward call: the gate and the up GEMM, 2·M·N·K each (docs/math.md §1, Hoffmann 2022 App. F)."""
    (m, k), n = x, w_gate[0]
    return 2 * 2 * m * n * k


def _backward_flops(grad_h, x, w_gate, w_up, *, out_shape=None, **_: object) -> int:
    """FLOPs of one backward call in model FLOPs: 2 × forward (input and weight gradients of both GEMMs).

    The recomputed gate/up GEMMs (another 4·M·N·K) are hardware FLOPs, not model FLOPs, as for activation
    checkpointing and for the attention backward's recomputed scores."""
    return 2 * _forward_flops(x, w_gate, w_up)


register_flop_formula(torch.ops.lightning_scaling.swiglu_gate_up_forward, _forward_flops)
register_flop_formula(torch.ops.lightning_scaling.swiglu_gate_up_backward, _backward_flops)


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------
def swiglu_gate_up(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """``silu(x @ w_gate.T) * (x @ w_up.T)`` with the gate/up GEMMs fused (differentiable).

    ``x`` [..., d_model]; ``w_gate``, ``w_up`` [d_ff, d_model] (``nn.Linear.weight``), one dtype and device.
    Returns [..., d_ff]. On CUDA (and on the CPU under ``triton_on_cpu()``) runs the Triton kernels; otherwise
    the PyTorch reference. Keeps only ``x`` and the weights for the backward, which recomputes both GEMMs.
    Under ``torch.autocast`` the three are cast to the autocast dtype first, as ``F.linear`` would be.
    """
    x, w_gate, w_up = autocast_like_linear(x, w_gate, w_up)
    check_gate_up_inputs(x, w_gate, w_up)
    lead = x.shape[:-1]
    h = swiglu_gate_up_forward(x.reshape(-1, x.shape[-1]), w_gate, w_up)
    return h.view(*lead, w_gate.shape[0])
