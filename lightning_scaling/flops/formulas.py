"""Analytic FLOPs and parameter counts of a decoder-only transformer (pure math: no torch, no Lightning).

Units: a FLOP is one floating-point operation (a multiply-add is 2). ``transformer_flops`` returns FLOPs per
SEQUENCE of ``seq_len`` tokens (``.per_token`` divides by ``seq_len``); training FLOPs are forward + backward
of the model ("model FLOPs": no activation recomputation).

Causal-attention convention (one for the whole library)
-------------------------------------------------------
``causal_attention="half"`` (``DEFAULT_CAUSAL_ATTENTION``): a causal kernel computes only the lower triangle of
the S×S score matrix, so the two attention matmuls (Q·Kᵀ and softmax·V) and the softmax of a causal layer
count HALF of their full cost: ``attention_flops = 4·B·H·Sq·Sk·D / 2`` forward. This is how FlashAttention and
the Triton fused-attention tutorial count. ``causal_attention="full"`` counts the whole square, as PyTorch's
``torch.utils.flop_counter.FlopCounterMode`` does. Non-causal attention is always counted in full. The halving
is exactly ½ (not (S+1)/(2S)), whatever Sq and Sk. The backward pass of attention is counted as 2 × its
forward (model FLOPs, like the rest of the network), not the 2.5 × of a kernel that recomputes the scores.

Analytic conventions (``convention=``)
--------------------------------------
- ``"chinchilla"`` (Hoffmann et al. 2022, App. F): embeddings 2·S·V·d, per layer QKV 6·S·d·(kH), scores
  2·S²·(kH), softmax 3·H·S², values 2·S²·(kH), output projection 2·S·(kH)·d, MLP 2·S·(2·d·f) (3·d·f when
  gated), final logits 2·S·d·V; backward = 2 × forward.
- ``"kaplan"`` (Kaplan et al. 2020, Table 1): forward per token 2N + 2·n_layer·n_ctx·d_attn with
  N = n_layer·(4·d·d_attn + 2·d·f) non-embedding (3·d·f when gated); no embedding, softmax or logit FLOPs;
  training = 3 × forward. Kaplan's context term 2·n_layer·n_ctx·d_attn is the causal-"half" count of the two
  attention matmuls; under ``causal_attention="full"`` (or ``causal=False``) it is doubled.
- ``"palm"`` (Chowdhery et al. 2022, App. B): training per token 6N + 12·L·H·Q·T with N the parameters that
  take part in matmuls (the layers' weight matrices and the d×V output head; not the embedding lookups nor
  norms). PaLM's 12·L·H·Q·T is the "full" count; under ``causal_attention="half"`` a causal model gets
  6·L·H·Q·T.

Each paper's printed attention term is one of our two conventions (Kaplan = half, Chinchilla and PaLM = full);
we apply the library's chosen convention to all three so that they differ only in what else they count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_scaling.argument_checks import boolean, one_of, positive_int

CAUSAL_ATTENTION_CONVENTIONS: tuple[str, ...] = ("half", "full")
DEFAULT_CAUSAL_ATTENTION: str = "half"
FLOP_CONVENTIONS: tuple[str, ...] = ("chinchilla", "kaplan", "palm")
BREAKDOWN_COMPONENTS: tuple[str, ...] = (
    "embeddings",
    "qkv",
    "scores",
    "softmax",
    "values",
    "out_proj",
    "mlp",
    "logits",
)

__all__ = [
    "BREAKDOWN_COMPONENTS",
    "CAUSAL_ATTENTION_CONVENTIONS",
    "DEFAULT_CAUSAL_ATTENTION",
    "FLOP_CONVENTIONS",
    "ParamCount",
    "TransformerFlops",
    "attention_flops",
    "causal_attention_factor",
    "transformer_flops",
    "transformer_params",
]


def _check_bool(name: str, value: Any) -> bool:
    return boolean(name, value)


def causal_attention_factor(causal: bool, causal_attention: str = DEFAULT_CAUSAL_ATTENTION) -> float:
    """The fraction of the full S×S attention work counted: 0.5 for causal under "half", else 1.0."""
    _check_bool("causal", causal)
    one_of("causal_attention", causal_attention, CAUSAL_ATTENTION_CONVENTIONS)
    return 0.5 if (causal and causal_attention == "half") else 1.0


def attention_flops(
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    causal: bool,
    causal_attention: str = DEFAULT_CAUSAL_ATTENTION,
) -> float:
    """Forward FLOPs of the two attention matmuls, Q·Kᵀ and P·V, for a whole batch.

    ``4·batch·heads·q_len·kv_len·head_dim`` (two matmuls of 2·Sq·Sk·D each per head; FlashAttention's count),
    halved when ``causal`` under ``causal_attention="half"`` (module docstring). The softmax is not included.
    The backward is counted as 2 × this (model FLOPs), so one training step costs 3 × this.
    """
    for name, value in (
        ("batch", batch),
        ("heads", heads),
        ("q_len", q_len),
        ("kv_len", kv_len),
        ("head_dim", head_dim),
    ):
        positive_int(name, value)
    factor = causal_attention_factor(causal, causal_attention)
    # FlashAttention (Dao 2022) / Triton tutorial: 2 matmuls × 2·Sq·Sk·D per (batch, head), halved if causal
    return 4.0 * batch * heads * q_len * kv_len * head_dim * factor


@dataclass(frozen=True)
class TransformerFlops:
    """Training FLOPs of one sequence. ``breakdown`` maps component → forward FLOPs per sequence."""

    forward: float
    backward: float
    seq_len: int
    convention: str
    causal_attention: str
    breakdown: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Training FLOPs per sequence (forward + backward)."""
        return self.forward + self.backward

    @property
    def per_token(self) -> float:
        """Training FLOPs per token (``total / seq_len``)."""
        return self.total / self.seq_len


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts. ``embedding`` is the token embedding (and learned positions when counted; a head tied
    to the token embedding is the same tensor). ``non_embedding`` is everything else, an untied head included."""

    total: int
    embedding: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def _shape(
    n_layer: int, d_model: int, n_head: int, seq_len: int, vocab_size: int, d_ff: int | None
) -> tuple[int, int, int, int, int, int]:
    n_layer = positive_int("n_layer", n_layer)
    d_model = positive_int("d_model", d_model)
    n_head = positive_int("n_head", n_head)
    seq_len = positive_int("seq_len", seq_len)
    vocab_size = positive_int("vocab_size", vocab_size)
    d_ff = 4 * d_model if d_ff is None else positive_int("d_ff", d_ff)
    return n_layer, d_model, n_head, seq_len, vocab_size, d_ff


def _attention_widths(d_model: int, n_head: int, n_kv_head: int | None, head_dim: int | None) -> tuple[int, int]:
    """(d_attn, d_kv): the width of the queries (k·H) and of the keys and of the values (k·H_kv).

    Grouped-query attention (Ainslie et al. 2023; Llama 2/3, Mistral) shares each key/value head among
    ``n_head / n_kv_head`` query heads; ``head_dim`` k defaults to ``d_model / n_head``.
    """
    if head_dim is None:
        if d_model % n_head:
            raise ValueError(f"d_model must be divisible by n_head, got d_model={d_model}, n_head={n_head}")
        head_dim = d_model // n_head
    else:
        head_dim = positive_int("head_dim", head_dim)
    n_kv_head = n_head if n_kv_head is None else positive_int("n_kv_head", n_kv_head)
    if n_head % n_kv_head:
        raise ValueError(f"n_head must be a multiple of n_kv_head, got n_head={n_head}, n_kv_head={n_kv_head}")
    return head_dim * n_head, head_dim * n_kv_head


def transformer_flops(
    n_layer: int,
    d_model: int,
    n_head: int,
    seq_len: int,
    vocab_size: int,
    d_ff: int | None = None,
    gated_mlp: bool = False,
    causal: bool = True,
    convention: str = "chinchilla",
    causal_attention: str = DEFAULT_CAUSAL_ATTENTION,
    tied_embeddings: bool = True,
    n_kv_head: int | None = None,
    head_dim: int | None = None,
) -> TransformerFlops:
    """Analytic training FLOPs per sequence of a decoder-only transformer.

    ``d_ff`` defaults to ``4·d_model``; ``gated_mlp`` (SwiGLU) has three d×f matrices instead of two.
    ``convention`` is "chinchilla", "kaplan" or "palm" and ``causal_attention`` "half" or "full" (module
    docstring). ``tied_embeddings`` does not change the FLOPs of any convention (the head's matmul runs either
    way); it is accepted so a model config can be passed through unchanged. ``n_kv_head`` (grouped-query
    attention: fewer key/value heads than query heads) and ``head_dim`` (default ``d_model / n_head``) size the
    key and value projections and the attention width.
    """
    n_layer, d, n_head, s, v, f = _shape(n_layer, d_model, n_head, seq_len, vocab_size, d_ff)
    _check_bool("gated_mlp", gated_mlp)
    _check_bool("tied_embeddings", tied_embeddings)
    one_of("convention", convention, FLOP_CONVENTIONS)
    attn = causal_attention_factor(causal, causal_attention)
    d_attn, d_kv = _attention_widths(d, n_head, n_kv_head, head_dim)  # k·H and k·H_kv
    mlp_mats = 3 if gated_mlp else 2

    if convention == "chinchilla":
        # Hoffmann 2022 App. F, forward FLOPs per sequence; gated MLP = 3 d×f matrices (docs/math.md §1)
        breakdown = {
            "embeddings": 2.0 * s * v * d,
            "qkv": n_layer * 2.0 * s * d * (d_attn + 2 * d_kv),
            "scores": n_layer * 2.0 * s * s * d_attn * attn,
            "softmax": n_layer * 3.0 * n_head * s * s * attn,
            "values": n_layer * 2.0 * s * s * d_attn * attn,
            "out_proj": n_layer * 2.0 * s * d_attn * d,
            "mlp": n_layer * 2.0 * s * mlp_mats * d * f,
            "logits": 2.0 * s * d * v,
        }
    else:
        # Kaplan 2020 Table 1: C_forward = 2N + 2·n_layer·n_ctx·d_attn per token (context term = causal half), N
        # without embeddings. PaLM App. B: 6N + 12·L·H·Q·T per token for training = 3 × (2N + 4·L·H·Q·T) forward,
        # the same matmuls with the output projection (logits) in N.
        breakdown = {
            "embeddings": 0.0,
            "qkv": n_layer * 2.0 * d * (d_attn + 2 * d_kv) * s,
            "scores": n_layer * 2.0 * s * d_attn * s * attn,
            "softmax": 0.0,
            "values": n_layer * 2.0 * s * d_attn * s * attn,
            "out_proj": n_layer * 2.0 * d_attn * d * s,
            "mlp": n_layer * 2.0 * mlp_mats * d * f * s,
            "logits": 2.0 * d * v * s if convention == "palm" else 0.0,
        }
    forward = float(sum(breakdown.values()))
    # Chinchilla App. F: backward = 2 × forward; Kaplan Table 1 and PaLM App. B: training = 3 × forward
    return TransformerFlops(
        forward=forward,
        backward=2.0 * forward,
        seq_len=s,
        convention=convention,
        causal_attention=causal_attention,
        breakdown=breakdown,
    )


def transformer_params(
    n_layer: int,
    d_model: int,
    vocab_size: int,
    d_ff: int | None = None,
    gated_mlp: bool = False,
    tied_embeddings: bool = True,
    seq_len: int | None = None,
    linear_biases: bool = False,
    n_head: int | None = None,
    n_kv_head: int | None = None,
    head_dim: int | None = None,
) -> ParamCount:
    """Parameters of a decoder-only transformer laid out like ``examples/gpt.py``.

    Counted: token embedding V·d; learned positions seq_len·d when ``seq_len`` is given (None: rotary or no
    positions, nothing counted); per layer the attention matrices 4·d² and the MLP matrices 2·d·f (3·d·f when
    ``gated_mlp``); LayerNorm weight and bias, two per layer plus a final one, (4·n_layer + 2)·d; an output
    head d·V unless ``tied_embeddings``. Linear biases only when ``linear_biases`` (GPT-2 has them: 3d + d for
    attention, f + d for the MLP, 2f + d when gated). ``.embedding`` = token embedding + positions. With
    grouped-query attention (``n_head`` and ``n_kv_head``, optionally ``head_dim``) the attention matrices are
    d·(k·H + 2·k·H_kv) + k·H·d instead of 4·d².
    """
    n_layer = positive_int("n_layer", n_layer)
    d = positive_int("d_model", d_model)
    v = positive_int("vocab_size", vocab_size)
    f = 4 * d if d_ff is None else positive_int("d_ff", d_ff)
    _check_bool("gated_mlp", gated_mlp)
    _check_bool("tied_embeddings", tied_embeddings)
    _check_bool("linear_biases", linear_biases)
    positions = 0 if seq_len is None else positive_int("seq_len", seq_len) * d
    mlp_mats = 3 if gated_mlp else 2
    if n_head is None:
        if n_kv_head is not None or head_dim is not None:
            raise ValueError("n_head is needed with n_kv_head or head_dim")
        d_attn = d_kv = d
    else:
        d_attn, d_kv = _attention_widths(d, positive_int("n_head", n_head), n_kv_head, head_dim)
    attention = d * (d_attn + 2 * d_kv) + d_attn * d  # Q, K, V and output projections
    per_layer = attention + mlp_mats * d * f + 4 * d  # matrices + two LayerNorms (weight, bias)
    if linear_biases:
        per_layer += d_attn + 2 * d_kv + d + (mlp_mats - 1) * f + d
    embedding = v * d + positions
    total = embedding + n_layer * per_layer + 2 * d + (0 if tied_embeddings else d * v)
    return ParamCount(total=total, embedding=embedding)
