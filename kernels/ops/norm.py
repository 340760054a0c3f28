"""Fused LayerNorm and RMSNorm whose backward also returns each example's squared gradient norm: Triton kernels,
the ``torch.library`` ops (autograd, fake tensors, CPU reference path) and their FLOP formulas.

The by-product (Gray et al. 2024, "Normalization layer per-example gradients are sufficient to predict gradient
noise scale in transformers", arXiv 2411.00999). A norm layer y = x̂ ⊙ w (+ b) over the last dimension
(width H), with x̂ = (x − mean)·rstd (LayerNorm) or x·rstd (RMSNorm), has the weight gradient
dL/dw = Σ_rows dy ⊙ x̂. For inputs [B, T, H] (B examples of T rows each), example b's share of it is
g_b = Σ_t dy[b, t] ⊙ x̂[b, t] (and Σ_t dy[b, t] for the bias), and the backward kernel returns
|g_b|² = |g_b(w)|² + |g_b(b)|²: the squared norm of example b's gradient with respect to all of this layer's
parameters, weight and bias together (weight only for RMSNorm and a LayerNorm without bias), as a [B] tensor.

Which rows form an example: the first dimension of x. x of shape [B, T₁, ..., H] has B examples of T₁·...
rows each; x [N, H] has N examples of one row each; x [H] is one example. (Sequence-first layouts [T, B, H] are
not supported: transpose first.) The norms are those of the gradient pieces as they flow into the layer: with a
loss that is a mean over the batch they carry its 1/B, under mixed precision the loss scale, under gradient
accumulation the 1/k Lightning applies; the caller rescales (by B², scale², k²).

Kernels (the LayerNorm structure of Triton's tutorial "Layer Normalization"; fp32 accumulation for fp16/bf16/fp32
inputs; one whole row per tile, so H ≤ ``MAX_WIDTH`` = 16384 on the Triton path). Compiled for an H100 (sm_90,
Triton 3.9, bf16 and fp32, LayerNorm and RMSNorm) no kernel spills registers up to H = 8192; at 8192 < H ≤ 16384
the backward's row kernel spills 64-416 bytes per thread (slower, still correct; not measured on a GPU).

- forward: one program per block of rows writes y and saves the per-row mean (LayerNorm) and rstd in fp32.
- backward, stage 1: one program per (group of examples, chunk of rows): it recomputes x̂ from x, mean and rstd,
  writes dx, and sums dy ⊙ x̂ (and dy) over its rows in fp32. A program that holds whole examples (short
  examples, or many of them) squares each example's sum itself and writes |g_b|²; a long example is cut into
  ``chunks`` programs that write their partial sums. Either way each program writes one fp32 partial of dw
  (and db): [programs, H], with programs ≈ 4 × the GPU's SM count, never a [B, T, H] tensor.
- backward, stage 2: one program per block of columns sums the partials into dw and db and, for chunked
  examples, sums each example's chunks and squares them (partial squared norms per column block, added up by
  one small torch sum).

The CPU path (and float64) is a PyTorch reference in fp32 (float64 for float64 inputs); it forms dy ⊙ x̂ as a
[rows, H] temporary in the backward.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from lightning_scaling.flops.counter import register_flop_formula
from lightning_scaling.kernels import run_kernels, use_triton
from lightning_scaling.kernels.ops._inputs import check_float_tensor, reference_dtype

#: Widest row (H, elements) the Triton kernels take: a whole row is held in registers (see the module docstring).
MAX_WIDTH = 16384
_MAX_TILE = 4096  # elements per [rows, columns] tile in the row kernels
_MAX_CHUNKS = 256  # most programs one example is cut into (a power of two; stage 2 reshapes by it)
_REDUCE_TILE = 4096  # elements per [partials, columns] tile in stage 2


# ----------------------------------------------------------------------------------------------------------
# Forward: one program per BLOCK_ROWS rows of the [n_rows, n_cols] input, each row whole in one tile.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD, n_rows, n_cols, eps, RMS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]  # 64-bit: > 2**31 elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if RMS_NORM:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / n_cols
        xc = tl.where(mask, x - mean[:, None], 0.0)  # padding columns would hold -mean
        tl.store(MEAN + rows, mean, mask=row_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Backward, stage 1. Program p = group * chunks + chunk handles rows [chunk·R, min((chunk+1)·R, T)) of examples
# group·E ... group·E + E − 1 (E = examples_per_program, R = rows_per_chunk, T = rows_per_example).
#   x̂ = (x − mean)·rstd  (RMSNorm: x·rstd);   wdy = w ⊙ dy;   c1 = mean_h(x̂ ⊙ wdy);   c2 = mean_h(wdy)
#   dx = rstd·(wdy − x̂·c1 − c2)  (RMSNorm: no c2);   g_b(w) += Σ_rows dy ⊙ x̂;   g_b(b) += Σ_rows dy
# SINGLE_CHUNK (chunks == 1): each example lies whole in one program, which writes its squared norm.
# Every program writes its sums over all its rows to PARTIAL_DW[p] (PARTIAL_DB[p]). MANY_EXAMPLES (E > 1) is
# a separate specialisation: only it needs a second pair of [H] accumulators, which wide rows cannot afford in
# registers (w is reloaded per tile for the same reason; it stays in cache).
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _norm_bwd_rows(
    DY, X, W, MEAN, RSTD, DX, first_row, n_here, n_cols, RMS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """dx for rows first_row ... first_row + n_here − 1; returns their sums (Σ dy ⊙ x̂, Σ dy) in fp32."""
    cols = tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    g_w = tl.zeros([BLOCK_COLS], dtype=tl.float32)
    g_b = tl.zeros([BLOCK_COLS], dtype=tl.float32)
    for start in range(0, n_here, BLOCK_ROWS):
        local = start + tl.arange(0, BLOCK_ROWS)
        row_ok = local < n_here
        rows = first_row + local
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if RMS_NORM:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / n_cols
        if RMS_NORM:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / n_cols
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        g_w += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            g_b += tl.sum(dy, axis=0)
    return g_w, g_b


@triton.jit
def _norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DX, PARTIAL_DW, PARTIAL_DB, SQ_NORMS, n_cols, n_examples, rows_per_example,
    examples_per_program, chunks, rows_per_chunk, RMS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr, MANY_EXAMPLES: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    group = pid // chunks
    chunk = pid % chunks
    cols = tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    lo = chunk * rows_per_chunk
    hi = tl.minimum(lo + rows_per_chunk, rows_per_example)
    partial = pid.to(tl.int64) * n_cols + cols
    if MANY_EXAMPLES:  # whole examples only (SINGLE_CHUNK)
        dw_acc = tl.zeros([BLOCK_COLS], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_COLS], dtype=tl.float32)
        for e in range(examples_per_program):
            example = group * examples_per_program + e
            n_here = tl.where(example < n_examples, hi - lo, 0)
            g_w, g_b = _norm_bwd_rows(
                DY,
                X,
                W,
                MEAN,
                RSTD,
                DX,
                example.to(tl.int64) * rows_per_example + lo,  # 64-bit: > 2**31 elements
                n_here,
                n_cols,
                RMS_NORM,
                HAS_BIAS,
                BLOCK_ROWS,
                BLOCK_COLS,
            )
            dw_acc += g_w
            sq = tl.sum(g_w * g_w, axis=0)
            if HAS_BIAS:
                db_acc += g_b
                sq += tl.sum(g_b * g_b, axis=0)
            tl.store(SQ_NORMS + example, sq, mask=example < n_examples)
        tl.store(PARTIAL_DW + partial, dw_acc, mask=col_ok)
        if HAS_BIAS:
            tl.store(PARTIAL_DB + partial, db_acc, mask=col_ok)
    else:  # one example, whole or a chunk of it
        g_w, g_b = _norm_bwd_rows(
            DY, X, W, MEAN, RSTD, DX, group.to(tl.int64) * rows_per_example + lo, hi - lo, n_cols, RMS_NORM, HAS_BIAS,
            BLOCK_ROWS, BLOCK_COLS,
        )
        tl.store(PARTIAL_DW + partial, g_w, mask=col_ok)
        if HAS_BIAS:
            tl.store(PARTIAL_DB + partial, g_b, mask=col_ok)
        if SINGLE_CHUNK:
            sq = tl.sum(g_w * g_w, axis=0)
            if HAS_BIAS:
                sq += tl.sum(g_b * g_b, axis=0)
            tl.store(SQ_NORMS + group, sq)


# ----------------------------------------------------------------------------------------------------------
# Backward, stage 2: one program per BLOCK_COLS columns sums the [n_partials, n_cols] partials into dw (db).
# CHUNKS > 1: partials b·CHUNKS ... b·CHUNKS + CHUNKS − 1 are example b's pieces; their sum over this column
# block, squared and summed, goes to SQ_PARTS[b, column block] (BLOCK_P is a multiple of CHUNKS).
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _norm_bwd_reduce_kernel(
    PARTIAL_DW, PARTIAL_DB, DW, DB, SQ_PARTS, n_partials, n_cols, HAS_BIAS: tl.constexpr, CHUNKS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    dw = tl.zeros([BLOCK_COLS], dtype=tl.float32)
    db = tl.zeros([BLOCK_COLS], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        mask = (p < n_partials)[:, None] & col_ok[None, :]
        offs = p.to(tl.int64)[:, None] * n_cols + cols[None, :]
        part_w = tl.load(PARTIAL_DW + offs, mask=mask, other=0.0)
        dw += tl.sum(part_w, axis=0)
        if HAS_BIAS:
            part_b = tl.load(PARTIAL_DB + offs, mask=mask, other=0.0)
            db += tl.sum(part_b, axis=0)
        if CHUNKS > 1:
            g_w = tl.sum(tl.reshape(part_w, [BLOCK_P // CHUNKS, CHUNKS, BLOCK_COLS]), axis=1)
            sq = tl.sum(g_w * g_w, axis=1)
            if HAS_BIAS:
                g_b = tl.sum(tl.reshape(part_b, [BLOCK_P // CHUNKS, CHUNKS, BLOCK_COLS]), axis=1)
                sq += tl.sum(g_b * g_b, axis=1)
            examples = start // CHUNKS + tl.arange(0, BLOCK_P // CHUNKS)
            tl.store(SQ_PARTS + examples * tl.num_programs(0) + pid, sq, mask=examples < n_partials // CHUNKS)
    tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """How many backward programs to aim for: 4 per SM on a GPU; 4 in the interpreter (each program is slow
    there, and 4 makes small test shapes exercise both whole and chunked examples)."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def _prev_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _partition(n_examples: int, rows_per_example: int, target_programs: int) -> tuple[int, int, int]:
    """(examples_per_program, chunks, rows_per_chunk) for the backward's stage 1.

    Enough examples (2 × n_examples > target_programs): whole examples, several per program when there are more
    than ``target_programs``. Otherwise each example is cut into a power-of-two number of chunks (at most
    ``_MAX_CHUNKS``, at most its rows) so that about ``target_programs`` programs run."""
    if 2 * n_examples > target_programs or rows_per_example == 1:
        return triton.cdiv(n_examples, target_programs), 1, rows_per_example
    chunks = min(_MAX_CHUNKS, _prev_pow2(min(target_programs // n_examples, rows_per_example)))
    return 1, chunks, triton.cdiv(rows_per_example, chunks)


def _num_warps(tile: int) -> int:
    return min(16, max(1, tile // 512))


def _row_blocks(n_cols: int, rows: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps) for tiles of whole rows, ``rows`` being the most any program has."""
    block_cols = triton.next_power_of_2(n_cols)
    block_rows = max(1, min(_MAX_TILE // block_cols, triton.next_power_of_2(max(rows, 1))))
    return block_rows, block_cols, _num_warps(block_rows * block_cols)


def _triton_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, rms_norm: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, weight = x.contiguous(), weight.contiguous()
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    mean = torch.empty(0 if rms_norm else n_rows, dtype=torch.float32, device=x.device)
    block_rows, block_cols, warps = _row_blocks(n_cols, n_rows)
    _norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        x, weight, weight if bias is None else bias.contiguous(), y, rstd if rms_norm else mean, rstd, n_rows, n_cols,
        eps, RMS_NORM=rms_norm, HAS_BIAS=bias is not None, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        num_warps=warps,
    )
    return y, mean, rstd


def _triton_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    has_bias: bool, rms_norm: bool, examples: int, target_programs: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """(dx, dw, db, per-example squared norms); ``target_programs`` overrides the partition (tests)."""
    grad_out, x, weight = grad_out.contiguous(), x.contiguous(), weight.contiguous()
    n_rows, n_cols = x.shape
    rows_per_example = n_rows // examples
    per_program, chunks, rows_per_chunk = _partition(
        examples, rows_per_example, target_programs or _target_programs(x.device)
    )
    programs = triton.cdiv(examples, per_program) * chunks
    dx = torch.empty_like(x)
    partial_dw = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
    partial_db = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device) if has_bias else partial_dw
    sq_norms = torch.empty(examples, dtype=torch.float32, device=x.device)
    block_rows, block_cols, warps = _row_blocks(n_cols, rows_per_chunk)
    _norm_bwd_kernel[(programs,)](
        grad_out, x, weight, rstd if rms_norm else mean, rstd, dx, partial_dw, partial_db, sq_norms, n_cols, examples,
        rows_per_example, per_program, chunks, rows_per_chunk, RMS_NORM=rms_norm, HAS_BIAS=has_bias,
        SINGLE_CHUNK=chunks == 1, MANY_EXAMPLES=per_program > 1, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        num_warps=warps,
    )
    dw = torch.empty_like(weight)
    db = torch.empty_like(weight) if has_bias else weight.new_empty(0)
    block_p = max(chunks, 16)
    reduce_cols = max(16, min(triton.next_power_of_2(n_cols), _REDUCE_TILE // block_p))
    col_blocks = triton.cdiv(n_cols, reduce_cols)
    sq_parts = torch.empty(examples, col_blocks, dtype=torch.float32, device=x.device) if chunks > 1 else sq_norms
    _norm_bwd_reduce_kernel[(col_blocks,)](
        partial_dw, partial_db, dw, db if has_bias else dw, sq_parts, programs, n_cols, HAS_BIAS=has_bias,
        CHUNKS=chunks, BLOCK_P=block_p, BLOCK_COLS=reduce_cols, num_warps=_num_warps(block_p * reduce_cols),
    )
    if chunks > 1:
        sq_norms = sq_parts.sum(dim=1)
    return dx, dw, db, sq_norms


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference (the CPU path and float64), computing in fp32 or wider.
# ----------------------------------------------------------------------------------------------------------
def _reference_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, rms_norm: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ct = reference_dtype(x.dtype)
    xf = x.to(ct)
    if rms_norm:
        mean = xf.new_empty(0)
        centred = xf
    else:
        mean = xf.mean(dim=-1)
        centred = xf - mean[:, None]
    rstd = torch.rsqrt(centred.square().mean(dim=-1) + eps)
    y = centred * rstd[:, None] * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype), mean, rstd


def _reference_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    has_bias: bool, rms_norm: bool, examples: int,
) -> tuple[torch.Tensor, ...]:
    ct = reference_dtype(x.dtype)
    xf, dy, r = x.to(ct), grad_out.to(ct), rstd.to(ct)[:, None]
    xhat = xf * r if rms_norm else (xf - mean.to(ct)[:, None]) * r
    wdy = dy * weight.to(ct)
    dx = wdy - xhat * (xhat * wdy).mean(dim=-1, keepdim=True)
    if not rms_norm:
        dx = dx - wdy.mean(dim=-1, keepdim=True)
    dx = dx * r
    n_cols = x.shape[1]
    g_w = (dy * xhat).view(examples, -1, n_cols).sum(dim=1)  # [examples, H]: each example's weight gradient
    sq_norms = g_w.square().sum(dim=1)
    if has_bias:
        g_b = dy.view(examples, -1, n_cols).sum(dim=1)
        sq_norms = sq_norms + g_b.square().sum(dim=1)
        db = g_b.sum(dim=0).to(weight.dtype)
    else:
        db = weight.new_empty(0)
    return dx.to(x.dtype), g_w.sum(dim=0).to(weight.dtype), db, sq_norms


# ----------------------------------------------------------------------------------------------------------
# torch.library ops. The op takes x as [rows, H] (the wrappers flatten). ``per_example_sink`` is not read by the
# forward: its gradient is the per-example squared norms, which is how they leave the backward through autograd.
# ----------------------------------------------------------------------------------------------------------
def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return reference_dtype(x.dtype)


@torch.library.custom_op("lightning_scaling::norm_forward", mutates_args=())
def norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, per_example_sink: torch.Tensor | None, eps: float,
    rms_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm (``rms_norm=False``) or RMSNorm of x [rows, H] over H: (y [rows, H] in x's dtype, mean [rows]
    (LayerNorm; [0] for RMSNorm), rstd [rows]), the statistics in fp32 (float64 for float64 x)."""
    return run_kernels(x, _triton_forward, _reference_forward, x, weight, bias, eps, rms_norm)


@norm_forward.register_fake
def _(x, weight, bias, per_example_sink, eps, rms_norm):
    rows = x.shape[0]
    stats = _stats_dtype(x)
    return torch.empty_like(x), x.new_empty((0 if rms_norm else rows,), dtype=stats), x.new_empty((rows,), dtype=stats)


@torch.library.custom_op("lightning_scaling::norm_backward", mutates_args=())
def norm_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    has_bias: bool, rms_norm: bool, examples: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``norm_forward``: (dx [rows, H], dw [H], db [H] (or [0] without bias), per-example squared
    norms [examples] in fp32 (float64 for float64 x)), rows being ``examples`` equal runs of consecutive rows."""
    if examples < 1 or x.shape[0] % examples:
        raise ValueError(f"examples must be >= 1 and divide the number of rows ({x.shape[0]}), got {examples}")
    return run_kernels(
        x, _triton_backward, _reference_backward, grad_out, x, weight, mean, rstd, has_bias, rms_norm, examples
    )


@norm_backward.register_fake
def _(grad_out, x, weight, mean, rstd, has_bias, rms_norm, examples):
    return (
        torch.empty_like(x),
        torch.empty_like(weight),
        torch.empty_like(weight) if has_bias else weight.new_empty((0,)),
        x.new_empty((examples,), dtype=_stats_dtype(x)),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, per_example_sink, _, rms_norm = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.rms_norm = rms_norm
    ctx.examples = 1 if per_example_sink is None else per_example_sink.shape[0]
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y: torch.Tensor, grad_mean: torch.Tensor | None, grad_rstd: torch.Tensor | None):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db, sq_norms = norm_backward(grad_y, x, weight, mean, rstd, ctx.has_bias, ctx.rms_norm, ctx.examples)
    needs = ctx.needs_input_grad
    return (
        dx if needs[0] else None, dw if needs[1] else None, db if ctx.has_bias and needs[2] else None,
        sq_norms if needs[3] else None, None, None,
    )


norm_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# FLOP formulas. Model FLOPs: 0, as torch's FlopCounterMode counts native_layer_norm, rms_norm and every
# elementwise op, and as the model-FLOP formulas (Kaplan 2020 §2.1, Hoffmann 2022 App. F) leave norms out:
# swapping nn.LayerNorm for FusedLayerNorm leaves a model's FLOPs and MFU unchanged. Hardware FLOPs (what the
# kernels execute; ``TrainingFlopCounter.hardware_flops``): one FLOP per add, subtraction, multiplication or
# division on a [rows, H] operand (per-row work such as the square root is not counted), per element:
#   forward   LayerNorm 6 (+1 with bias): sum, subtract mean, square, sum, × rstd, × w (+ b); RMSNorm 4
#   backward  LayerNorm 12 (+1 with bias): x − mean, × rstd, w·dy, x̂·wdy, its sum, sum of wdy, x̂·c1, + c2,
#             subtract from wdy, × rstd, dy·x̂, its sum (db: sum of dy); RMSNorm 9 (no mean, no c2)
#   plus the per-example squared norms, 2 per example and parameter (square and sum): 2·examples·H per vector.
# ----------------------------------------------------------------------------------------------------------
def _forward_flops(x, weight, bias, per_example_sink, eps, rms_norm, *, out_shape=None, causal_attention="half") -> int:
    """Model FLOPs of one ``norm_forward`` call: 0 (norms are not model FLOPs)."""
    return 0


def _backward_flops(
    grad_out, x, weight, mean, rstd, has_bias, rms_norm, examples, *, out_shape=None, causal_attention="half"
) -> int:
    """Model FLOPs of one ``norm_backward`` call: 0 (norms are not model FLOPs)."""
    return 0


def forward_hardware_flops(x, weight, bias, per_example_sink, eps, rms_norm, *, out_shape=None) -> int:
    """FLOPs the forward kernel executes for x of shape [rows, H] (see the table above): rows·H·(4 RMSNorm,
    6 LayerNorm, 7 LayerNorm with bias)."""
    per_element = 4 if rms_norm else 6 + (bias is not None)
    return math.prod(x) * per_element


def backward_hardware_flops(grad_out, x, weight, mean, rstd, has_bias, rms_norm, examples, *, out_shape=None) -> int:
    """FLOPs the backward kernels execute for x of shape [rows, H] (see the table above): rows·H·(9 RMSNorm,
    12 LayerNorm, 13 LayerNorm with bias) + 2·examples·H per parameter vector (weight, bias)."""
    per_element = 9 if rms_norm else 12 + bool(has_bias)
    vectors = 1 + bool(has_bias)
    return math.prod(x) * per_element + 2 * examples * x[-1] * vectors


register_flop_formula(torch.ops.lightning_scaling.norm_forward, _forward_flops, forward_hardware_flops)
register_flop_formula(torch.ops.lightning_scaling.norm_backward, _backward_flops, backward_hardware_flops)


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------
def _examples_of(x: torch.Tensor) -> int:
    return 1 if x.dim() == 1 else x.shape[0]


def _normalize(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float | None,
    per_example_sink: torch.Tensor | None, rms_norm: bool,
) -> torch.Tensor:
    check_float_tensor("x", x)
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"x must have at least one dimension and one element, got shape {tuple(x.shape)}")
    width = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        t = check_float_tensor(name, t, like=x, same_dtype=False)  # fp32 weights with 16-bit x
        if t.shape != (width,):
            raise ValueError(f"{name} must be 1-D [H={width}] (x's last dimension), got shape {tuple(t.shape)}")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    examples = _examples_of(x)
    if per_example_sink is not None:
        check_float_tensor("per_example_sink", per_example_sink, like=x, same_dtype=False)
        if per_example_sink.shape != (examples,):
            raise ValueError(
                f"per_example_sink must be 1-D [{examples}] (one entry per example, x's first "
                f"dimension), got shape {tuple(per_example_sink.shape)}"
            )
        if not per_example_sink.requires_grad:
            raise ValueError(
                "per_example_sink must require grad (its gradient receives the squared norms); "
                "make it with torch.zeros(examples, requires_grad=True)"
            )
    if use_triton(x) and width > MAX_WIDTH:
        raise ValueError(f"x's last dimension must be at most {MAX_WIDTH} for the Triton kernels, got {width}")
    y, _, _ = norm_forward(x.reshape(-1, width), weight, bias, per_example_sink, float(eps), rms_norm)
    return y.view(x.shape)


def fused_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    per_example_sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dimension, ``(x − mean)/sqrt(var + eps) ⊙ weight (+ bias)``; differentiable.

    ``x`` [B, ..., H] (any float dtype; fp16/bf16/fp32 accumulate in fp32), ``weight`` and ``bias`` [H] (any
    float dtype, on x's device); returns x's shape and dtype. ``eps``: added to the variance (≥ 0).
    ``per_example_sink``: None, or a tensor [B] that requires grad (float32; float64 for float64 x): the backward
    adds to its gradient each example's squared gradient norm |g_b(w)|² + |g_b(b)|² for this layer (examples
    are x's first dimension; see the module docstring). One sink shared by several layers collects the sum over
    them. On CUDA (and on the CPU under ``triton_on_cpu()``) runs the Triton kernels, which take H ≤
    ``MAX_WIDTH``; otherwise the PyTorch reference.
    """
    return _normalize(x, weight, bias, eps, per_example_sink, rms_norm=False)


def fused_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float | None = None, per_example_sink: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm over the last dimension, ``x/sqrt(mean(x²) + eps) ⊙ weight``; differentiable.

    As ``fused_layer_norm`` without mean subtraction and bias. ``eps`` None means ``torch.finfo(x.dtype).eps``,
    as in ``torch.nn.RMSNorm``. The sink receives |g_b(w)|² per example.
    """
    return _normalize(x, weight, None, eps, per_example_sink, rms_norm=True)
