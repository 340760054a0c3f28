"""Fused attention, FlashAttention-2 style: Triton forward and backward kernels, the ``torch.library`` ops
(autograd, fake tensors, CPU reference path) and their FLOP formulas.

Shapes: ``q`` is [batch, heads, q_len, head_dim]; ``k`` and ``v`` are [batch, heads, kv_len, head_dim].
Causal masking is top-left aligned like ``F.scaled_dot_product_attention(is_causal=True)``: query i sees keys
j <= i. The softmax scale defaults to 1/sqrt(head_dim).

Algorithm (Dao 2023, FlashAttention-2, arXiv 2307.08691, Alg. 1 and 2): the forward streams key/value blocks
through an online softmax and saves only the output and the row log-sum-exp; the backward recomputes the
probabilities block by block from the log-sum-exp, after a preprocess that computes delta = rowsum(dO * O).
Accumulation is in fp32 for fp16/bf16 inputs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lightning_scaling.flops.counter import register_flop_formula
from lightning_scaling.flops.formulas import attention_flops
from lightning_scaling.kernels import interpreter_enabled, run_kernels, use_triton
from lightning_scaling.kernels.ops._inputs import reference_dtype

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634  # log2(e): the kernels use exp2, so scores are pre-multiplied by log2(e)


# ----------------------------------------------------------------------------------------------------------
# Block sizes. The interpreter cannot autotune (and each program instance costs ~1 ms), so it gets one small
# config; on a GPU the autotuner picks among a few per (sequence lengths, head dim, causal), drawn from the lists
# below for the head dim and dtype at hand. Each 16-bit list was checked by compiling for the H100 (sm_90) with
# benchmarks/kernel_resources.py: no register spills, shared memory within 227 KiB, and every dot on the
# warpgroup MMA (HGMMA), which needs the dot's M side (BLOCK_M; BLOCK_N in the dK/dV kernel) to be at least 64.
# fp32 inputs (exact fp32 dots on the FMA units, which need far more registers) get small tiles that do not spill.
# ----------------------------------------------------------------------------------------------------------
_Tile = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
# Keyed by (input bits, head dim bucket): 16 = fp16/bf16 inputs, 32 = fp32; head dims 16-64 share the 64 list.
_FWD_TILES: dict[tuple[int, int], list[_Tile]] = {
    (16, 64): [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (64, 128, 8, 3)],
    (16, 128): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 8, 2), (128, 32, 8, 3)],
    (32, 64): [(32, 32, 4, 2), (32, 64, 8, 2)],
    (32, 128): [(32, 64, 8, 2), (16, 64, 4, 2)],
}
_DKDV_TILES: dict[tuple[int, int], list[_Tile]] = {
    (16, 64): [(64, 64, 4, 3), (64, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 4)],
    (16, 128): [(32, 64, 4, 3), (32, 64, 8, 3), (16, 64, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3)],
    (32, 64): [(32, 32, 8, 2), (16, 32, 4, 2)],
    (32, 128): [(16, 32, 4, 2), (16, 16, 4, 2)],
}
_DQ_TILES: dict[tuple[int, int], list[_Tile]] = {
    (16, 64): [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (128, 32, 4, 3), (64, 32, 4, 4)],
    (16, 128): [(64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (64, 32, 4, 3)],
    (32, 64): [(32, 32, 4, 2), (32, 64, 8, 2)],
    (32, 128): [(32, 64, 8, 2), (16, 64, 4, 2)],
}


def _tile_of(config: triton.Config) -> _Tile:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def _configs(tiles: dict[tuple[int, int], list[_Tile]]) -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    unique = dict.fromkeys(t for ts in tiles.values() for t in ts)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in unique]


def _pruner(tiles: dict[tuple[int, int], list[_Tile]]):
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        if interpreter_enabled():
            return configs
        bits = 32 if named_args["Q"].dtype == torch.float32 else 16
        wanted = set(tiles[(bits, 64 if kwargs["HEAD_DIM"] <= 64 else 128)])
        return [c for c in configs if _tile_of(c) in wanted]

    return prune


_FWD_CONFIGS, _DKDV_CONFIGS, _DQ_CONFIGS = (_configs(t) for t in (_FWD_TILES, _DKDV_TILES, _DQ_TILES))
_PRE_BLOCK_M = 16 if interpreter_enabled() else 128
_KEY = ["SEQ_Q", "SEQ_K", "HEAD_DIM", "CAUSAL", "DOT_PRECISION"]


# ----------------------------------------------------------------------------------------------------------
# Forward: one program per (block of BLOCK_M queries, batch*head); loop over key/value blocks in two stages.
# Stage 1 takes the key blocks that every query of the block sees in full (below the causal diagonal, inside
# SEQ_K) with no masking; stage 2 the few blocks on the diagonal or at the ragged end, masked.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, K, V, offs_m, lo, hi, SEQ_K, qk_scale, stride_ks, stride_kd, stride_vs, stride_vd,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = K + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd  # [HEAD_DIM, BLOCK_N]
        v_ptrs = V + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd  # [BLOCK_N, HEAD_DIM]
        if MASKED:
            k_t = tl.load(k_ptrs, mask=cols[None, :] < SEQ_K, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < SEQ_K, other=0.0)
        else:
            k_t = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            keep = cols[None, :] < SEQ_K
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            s = tl.where(keep, s, float("-inf"))
        # Online softmax (FlashAttention-2 Alg. 1): rescale the old sum and accumulator to the new max. Every
        # row has a finite max after its first block (stage 1, or key 0 on the diagonal), so no inf - inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _unmasked_key_end(start_m, SEQ_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    # End of the key blocks that every query of query block start_m sees in full (a multiple of BLOCK_N).
    if CAUSAL:
        return (tl.minimum(start_m * BLOCK_M, SEQ_K) // BLOCK_N) * BLOCK_N
    return (SEQ_K // BLOCK_N) * BLOCK_N


@triton.jit
def _program_batch_head(H):
    # Axis 1 of the grid runs over batch*head; the 64-bit batch and head indices (batch offsets pass 2**31
    # elements at large batch x seq).
    off_bh = tl.program_id(1)
    return off_bh, (off_bh // H).to(tl.int64), (off_bh % H).to(tl.int64)


@triton.jit
def _load_rows(base, rows, offs_d, stride_row, stride_d, n_rows):
    # The [rows, HEAD_DIM] tile at base[rows, :], zero in the rows at or past n_rows.
    return tl.load(base + rows[:, None] * stride_row + offs_d[None, :] * stride_d, mask=rows[:, None] < n_rows,
                   other=0.0)


@triton.jit
def _store_rows(base, rows, offs_d, stride_row, stride_d, n_rows, value):
    # Store the [rows, HEAD_DIM] tile value at base[rows, :] (in base's dtype), except the rows at or past n_rows.
    tl.store(base + rows[:, None] * stride_row + offs_d[None, :] * stride_d, value.to(base.dtype.element_ty),
             mask=rows[:, None] < n_rows)


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _pruner(_FWD_TILES)})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd, stride_vb,
    stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od, H, SEQ_Q, SEQ_K, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh, off_b, off_h = _program_batch_head(H)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh

    # This block of queries stays in registers for the whole loop.
    q = _load_rows(Q, offs_m, offs_d, stride_qs, stride_qd, SEQ_Q)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Causal: keys past the last query of this block are all masked, so stop there.
    hi = tl.minimum((start_m + 1) * BLOCK_M, SEQ_K) if CAUSAL else SEQ_K
    mid = _unmasked_key_end(start_m, SEQ_K, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K, V, offs_m, 0, mid, SEQ_K, qk_scale, stride_ks, stride_kd, stride_vs, stride_vd, HEAD_DIM,
        DOT_PRECISION, BLOCK_N, False, CAUSAL,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K, V, offs_m, mid, hi, SEQ_K, qk_scale, stride_ks, stride_kd, stride_vs, stride_vd, HEAD_DIM,
        DOT_PRECISION, BLOCK_N, True, CAUSAL,
    )

    # Every row sees key 0 (top-left causal), so l_i > 0 and nothing divides by zero.
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634  # natural-log log-sum-exp of the scaled scores
    tl.store(LSE + off_bh * SEQ_Q + offs_m, lse, mask=offs_m < SEQ_Q)
    _store_rows(O + off_b * stride_ob + off_h * stride_oh, offs_m, offs_d, stride_os, stride_od, SEQ_Q, acc)


# ----------------------------------------------------------------------------------------------------------
# Backward, step 1: delta_i = sum_d dO[i, d] * O[i, d] (the softmax Jacobian's row term).
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, stride_ob, stride_oh, stride_os, stride_od, stride_dob, stride_doh, stride_dos, stride_dod, H, SEQ_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh, off_b, off_h = _program_batch_head(H)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = _load_rows(O + off_b * stride_ob + off_h * stride_oh, offs_m, offs_d, stride_os, stride_od, SEQ_Q)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, offs_d, stride_dos, stride_dod, SEQ_Q)
    o, do = o.to(tl.float32), do.to(tl.float32)
    tl.store(DELTA + off_bh * SEQ_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < SEQ_Q)


# ----------------------------------------------------------------------------------------------------------
# Backward, step 2: one program per (block of BLOCK_N keys, batch*head) accumulates dK and dV over queries.
# dV = P^T dO;  dP = dO V^T;  dS = P * (dP - delta);  dK = scale * dS^T Q   (FlashAttention-2 Alg. 2)
# Only the causal diagonal is masked. Elsewhere no mask is needed: a query row past SEQ_Q loads q = dO = 0 and
# lse = delta = 0, so it adds exactly 0 to dK and dV; a key row past SEQ_K only touches its own (unstored) row.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, Q, DO, LSE, DELTA, offs_n, lo, hi, SEQ_Q, qk_scale, stride_qs, stride_qd, stride_dos, stride_dod,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q_t = tl.load(
            Q + rows[None, :] * stride_qs + offs_d[:, None] * stride_qd, mask=rows[None, :] < SEQ_Q, other=0.0
        )  # [HEAD_DIM, BLOCK_M]
        do = tl.load(
            DO + rows[:, None] * stride_dos + offs_d[None, :] * stride_dod, mask=rows[:, None] < SEQ_Q, other=0.0
        )  # [BLOCK_M, HEAD_DIM]
        lse = tl.load(LSE + rows, mask=rows < SEQ_Q, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + rows, mask=rows < SEQ_Q, other=0.0)
        # Transposed probabilities P^T [BLOCK_N, BLOCK_M], recomputed from the saved log-sum-exp.
        p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(rows[None, :] >= offs_n[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _pruner(_DKDV_TILES)})
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks,
    stride_kd, stride_vb, stride_vh, stride_vs, stride_vd, stride_dob, stride_doh, stride_dos, stride_dod, H, SEQ_Q,
    SEQ_K, sm_scale, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0)
    off_bh, off_b, off_h = _program_batch_head(H)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    Q += off_b * stride_qb + off_h * stride_qh
    DO += off_b * stride_dob + off_h * stride_doh
    LSE += off_bh * SEQ_Q
    DELTA += off_bh * SEQ_Q

    k = _load_rows(K + off_b * stride_kb + off_h * stride_kh, offs_n, offs_d, stride_ks, stride_kd, SEQ_K)
    v = _load_rows(V + off_b * stride_vb + off_h * stride_vh, offs_n, offs_d, stride_vs, stride_vd, SEQ_K)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    if CAUSAL:
        # Queries before this key block never see it: start at the query block holding its first key. Query
        # blocks that start at or past its last key see all of it: no mask from there on.
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv((start_n + 1) * BLOCK_N, BLOCK_M) * BLOCK_M, SEQ_Q)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Q, DO, LSE, DELTA, offs_n, lo, mid, SEQ_Q, qk_scale, stride_qs, stride_qd, stride_dos,
            stride_dod, HEAD_DIM, DOT_PRECISION, BLOCK_M, True,
        )
    else:
        mid = 0
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, Q, DO, LSE, DELTA, offs_n, mid, SEQ_Q, SEQ_Q, qk_scale, stride_qs, stride_qd, stride_dos,
        stride_dod, HEAD_DIM, DOT_PRECISION, BLOCK_M, False,
    )

    dk *= sm_scale
    _store_rows(DK + off_bh.to(tl.int64) * SEQ_K * HEAD_DIM, offs_n, offs_d, HEAD_DIM, 1, SEQ_K, dk)
    _store_rows(DV + off_bh.to(tl.int64) * SEQ_K * HEAD_DIM, offs_n, offs_d, HEAD_DIM, 1, SEQ_K, dv)


# ----------------------------------------------------------------------------------------------------------
# Backward, step 3: one program per (block of BLOCK_M queries, batch*head) accumulates dQ over keys, in the
# forward's two stages (unmasked key blocks, then the diagonal and the ragged end, masked).  dQ = scale * dS K
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta, K, V, offs_m, lo, hi, SEQ_K, qk_scale, stride_ks, stride_kd, stride_vs, stride_vd,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = K + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd  # [BLOCK_N, HEAD_DIM]
        v_ptrs = V + cols[None, :] * stride_vs + offs_d[:, None] * stride_vd  # [HEAD_DIM, BLOCK_N]
        if MASKED:
            k = tl.load(k_ptrs, mask=cols[:, None] < SEQ_K, other=0.0)
            v_t = tl.load(v_ptrs, mask=cols[None, :] < SEQ_K, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v_t = tl.load(v_ptrs)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            keep = cols[None, :] < SEQ_K
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _pruner(_DQ_TILES)})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd, stride_dob, stride_doh, stride_dos, stride_dod, H, SEQ_Q, SEQ_K,
    sm_scale, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh, off_b, off_h = _program_batch_head(H)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh

    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, offs_d, stride_qs, stride_qd, SEQ_Q)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, offs_d, stride_dos, stride_dod, SEQ_Q)
    lse = tl.load(LSE + off_bh * SEQ_Q + offs_m, mask=offs_m < SEQ_Q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + off_bh * SEQ_Q + offs_m, mask=offs_m < SEQ_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # 1.4426950408889634 = log2(e) throughout (the kernels use exp2)

    # Causal: keys past the last query of this block are all masked, so stop there. A query row past SEQ_Q
    # (q = dO = 0, lse = delta = 0) gets dS = 0 in the unmasked stage and is not stored.
    hi = tl.minimum((start_m + 1) * BLOCK_M, SEQ_K) if CAUSAL else SEQ_K
    mid = _unmasked_key_end(start_m, SEQ_K, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, K, V, offs_m, 0, mid, SEQ_K, qk_scale, stride_ks, stride_kd, stride_vs, stride_vd,
        HEAD_DIM, DOT_PRECISION, BLOCK_N, False, CAUSAL,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, K, V, offs_m, mid, hi, SEQ_K, qk_scale, stride_ks, stride_kd, stride_vs, stride_vd,
        HEAD_DIM, DOT_PRECISION, BLOCK_N, True, CAUSAL,
    )

    dq *= sm_scale
    _store_rows(DQ + off_bh.to(tl.int64) * SEQ_Q * HEAD_DIM, offs_m, offs_d, HEAD_DIM, 1, SEQ_Q, dq)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (no TF32), so fp32 results match PyTorch's fp32 math.
    return "ieee" if dtype == torch.float32 else "tf32"


def _triton_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, sq, d = q.shape
    sk = k.shape[2]
    out = torch.empty((b, h, sq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), h, sq, sk, scale * _LOG2E, HEAD_DIM=d,
        CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype),
    )
    return out, lse


def _triton_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, sq, d = q.shape
    sk = k.shape[2]
    delta = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess_kernel[(triton.cdiv(sq, _PRE_BLOCK_M), b * h)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), h, sq, HEAD_DIM=d, BLOCK_M=_PRE_BLOCK_M
    )
    dq = torch.empty((b, h, sq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, h, sk, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, h, sk, d), dtype=v.dtype, device=v.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    flags = dict(HEAD_DIM=d, CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype))
    _attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(sk, meta["BLOCK_N"]), b * h)](
        q, k, v, grad_out, lse, delta, dk, dv, *strides, h, sq, sk, scale, **flags
    )
    _attn_bwd_dq_kernel[lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h)](
        q, k, v, grad_out, lse, delta, dq, *strides, h, sq, sk, scale, **flags
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference (the CPU path): materialises the [q_len, kv_len] scores, computes in fp32 or wider.
# ----------------------------------------------------------------------------------------------------------
def _reference_probabilities(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        sq, sk = scores.shape[-2:]
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)), lse


def _reference_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    ct = reference_dtype(q.dtype)
    p, lse = _reference_probabilities(q.to(ct), k.to(ct), None, causal, scale)
    return torch.matmul(p, v.to(ct)).to(q.dtype), lse.to(torch.float32)


def _reference_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ct = reference_dtype(q.dtype)
    q32, k32, v32, do32 = q.to(ct), k.to(ct), v.to(ct), grad_out.to(ct)
    p, _ = _reference_probabilities(q32, k32, lse.to(ct), causal, scale)
    delta = (do32 * out.to(ct)).sum(-1, keepdim=True)
    dv = torch.matmul(p.transpose(-2, -1), do32)
    ds = p * (torch.matmul(do32, v32.transpose(-2, -1)) - delta)
    dq = torch.matmul(ds, k32) * scale
    dk = torch.matmul(ds.transpose(-2, -1), q32) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------------------
# torch.library ops: forward returns (out, lse); backward is its own op so FlopCounterMode sees it.
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("lightning_scaling::flash_attention_forward", mutates_args=())
def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output [B, H, Sq, D] (dtype of q) and row log-sum-exp [B, H, Sq] (fp32, natural log)."""
    return run_kernels(q, _triton_forward, _reference_forward, q, k, v, causal, scale)


@flash_attention_forward.register_fake
def _(q, k, v, causal, scale):
    b, h, sq, d = q.shape
    return q.new_empty((b, h, sq, d)), q.new_empty((b, h, sq), dtype=torch.float32)


@torch.library.custom_op("lightning_scaling::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of ``flash_attention_forward``, recomputing probabilities from ``lse``."""
    return run_kernels(q, _triton_backward, _reference_backward, grad_out, q, k, v, out, lse, causal, scale)


@flash_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, causal, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = flash_attention_backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


flash_attention_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# FLOP formulas (model FLOPs; the causal convention comes from lightning_scaling.flops).
# ----------------------------------------------------------------------------------------------------------
def _forward_flops(q, k, v, causal, scale, *, out_shape=None, causal_attention="half") -> int:
    """FLOPs of one ``flash_attention_forward`` call; ``q``/``k``/``v`` are shapes (the counter's convention)."""
    # docs/math.md §1 (Hoffmann 2022 App. F; FlashAttention's count): Q·Kᵀ and softmax·V, 4·B·H·Sq·Sk·D, halved if
    # causal under "half" (lightning_scaling.flops.attention_flops). The softmax itself is not counted.
    b, h, sq, d = q
    return int(attention_flops(b, h, sq, k[2], d, bool(causal), causal_attention))


def _backward_flops(grad_out, q, k, v, out, lse, causal, scale, *, out_shape=None, causal_attention="half") -> int:
    """FLOPs of one ``flash_attention_backward`` call (model FLOPs = 2 × forward)."""
    # docs/math.md §1 (Hoffmann 2022 App. F): backward = 2 × forward in model FLOPs. FlashAttention reports 2.5 ×
    # because its backward recomputes Q·Kᵀ: that is hardware FLOPs (HFU), not the model FLOPs of MFU.
    return 2 * _forward_flops(q, k, v, causal, scale, causal_attention=causal_attention)


register_flop_formula(torch.ops.lightning_scaling.flash_attention_forward, _forward_flops, attention=True)
register_flop_formula(torch.ops.lightning_scaling.flash_attention_backward, _backward_flops, attention=True)


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k must be [batch={b}, heads={h}, kv_len, head_dim={d}] like q, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"q and k need at least one position, got q_len={q.shape[2]}, kv_len={k.shape[2]}")
    if use_triton(q) and d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q head_dim must be one of {SUPPORTED_HEAD_DIMS} for the Triton kernels, got {d}")


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale · q kᵀ [+ causal mask]) v without materialising the scores; differentiable.

    ``q`` [batch, heads, q_len, head_dim], ``k``/``v`` [batch, heads, kv_len, head_dim], all one dtype and
    device; returns [batch, heads, q_len, head_dim]. ``scale`` defaults to 1/sqrt(head_dim). On CUDA (and on
    the CPU under ``triton_on_cpu()``) fp16/bf16/fp32 run the Triton kernels, which take head_dim in
    {16, 32, 64, 128}; otherwise (and for float64) the PyTorch reference.
    """
    _check_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    out, _ = flash_attention_forward(q, k, v, bool(causal), float(scale))
    return out
