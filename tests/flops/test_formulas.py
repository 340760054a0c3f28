"""lightning_scaling.flops.formulas: analytic transformer FLOPs and parameter counts by hand and against the
papers' formulas; and bad input, fuzzed: every argument either gives finite counts or is rejected by name."""

import math
import subprocess
import sys

import pytest
from helpers import FUZZ, INF, NAN, answer_or_value_error, any_value, assert_finite
from hypothesis import example, given
from hypothesis import strategies as st

from lightning_scaling.flops.formulas import (
    BREAKDOWN_COMPONENTS,
    CAUSAL_ATTENTION_CONVENTIONS,
    DEFAULT_CAUSAL_ATTENTION,
    FLOP_CONVENTIONS,
    attention_flops,
    causal_attention_factor,
    transformer_flops,
    transformer_params,
)

TINY = dict(n_layer=2, d_model=8, n_head=2, seq_len=4, vocab_size=10, d_ff=32)


ATTENTION_TERMS = {"scores", "softmax", "values"}


def test_library_convention_is_named():
    assert CAUSAL_ATTENTION_CONVENTIONS == ("half", "full")
    assert DEFAULT_CAUSAL_ATTENTION == "half"


@pytest.mark.parametrize("convention", FLOP_CONVENTIONS)
@pytest.mark.parametrize("causal_attention", CAUSAL_ATTENTION_CONVENTIONS)
@pytest.mark.parametrize("gated_mlp", [False, True])
def test_breakdown_sums_to_forward_and_backward_is_twice_forward(convention, causal_attention, gated_mlp):
    f = transformer_flops(
        6, 256, 8, 512, 1000, gated_mlp=gated_mlp, convention=convention, causal_attention=causal_attention
    )
    assert set(f.breakdown) == set(BREAKDOWN_COMPONENTS)
    assert sum(f.breakdown.values()) == pytest.approx(f.forward, rel=1e-12)
    assert f.backward == 2 * f.forward
    assert f.total == 3 * f.forward
    assert f.per_token == pytest.approx(f.total / 512, rel=1e-12)


def test_chinchilla_appendix_f_by_hand_full_attention():
    # S=4, V=10, d=8, H=2 (k=4, kH=8), f=32, L=2; Hoffmann 2022 App. F term by term
    f = transformer_flops(**TINY, causal=False)
    assert f.breakdown == {
        "embeddings": 2 * 4 * 10 * 8,  # 640
        "qkv": 2 * (2 * 3 * 4 * 8 * 8),  # 2 layers x 1536
        "scores": 2 * (2 * 4 * 4 * 8),  # 2 x 256
        "softmax": 2 * (3 * 2 * 4 * 4),  # 2 x 96
        "values": 2 * (2 * 4 * 4 * 8),  # 2 x 256
        "out_proj": 2 * (2 * 4 * 8 * 8),  # 2 x 512
        "mlp": 2 * (2 * 4 * (2 * 8 * 32)),  # 2 x 4096
        "logits": 2 * 4 * 8 * 10,  # 640
    }
    assert f.forward == 14784
    assert f.backward == 29568
    assert f.total == 44352
    assert f.per_token == 44352 / 4


def test_chinchilla_by_hand_causal_half_and_gated():
    half = transformer_flops(**TINY, causal=True, causal_attention="half")
    # per layer scores 256 -> 128, softmax 96 -> 48, values 256 -> 128
    assert half.forward == 14784 - 2 * (128 + 48 + 128)
    gated = transformer_flops(**TINY, causal=False, gated_mlp=True)
    assert gated.breakdown["mlp"] == 2 * (2 * 4 * (3 * 8 * 32))


def test_half_and_full_differ_exactly_by_the_attention_terms():
    full = transformer_flops(12, 768, 12, 1024, 50257, causal_attention="full")
    half = transformer_flops(12, 768, 12, 1024, 50257, causal_attention="half")
    for name in BREAKDOWN_COMPONENTS:
        if name in ATTENTION_TERMS:
            assert half.breakdown[name] == full.breakdown[name] / 2
        else:
            assert half.breakdown[name] == full.breakdown[name]
    attention_full = sum(full.breakdown[n] for n in ATTENTION_TERMS)
    assert full.forward - half.forward == pytest.approx(attention_full / 2, rel=1e-12)
    # the matmul part of the difference is exactly what attention_flops says, for all layers
    matmul_diff = sum(full.breakdown[n] - half.breakdown[n] for n in ("scores", "values"))
    per_layer = attention_flops(1, 12, 1024, 1024, 64, True, "full") - attention_flops(1, 12, 1024, 1024, 64, True)
    assert matmul_diff == pytest.approx(12 * per_layer, rel=1e-12)


def test_non_causal_attention_is_full_under_both_conventions():
    a = transformer_flops(**TINY, causal=False, causal_attention="half")
    b = transformer_flops(**TINY, causal=False, causal_attention="full")
    assert a.breakdown == b.breakdown


def test_kaplan_is_six_n_per_token_when_d_model_dominates_context():
    n_layer, d, s = 32, 4096, 128  # d_model >> n_ctx / 12
    f = transformer_flops(n_layer, d, 32, s, 50000, convention="kaplan")
    n = 2 * d * n_layer * (2 * d + 4 * d)  # Kaplan 2020 Table 1, non-embedding N
    # exact: 3 x (2N + 2 n_layer n_ctx d_attn) (the printed context term is the causal-"half" count)
    assert f.per_token == pytest.approx(3 * (2 * n + 2 * n_layer * s * d), rel=1e-12)
    assert f.per_token == pytest.approx(6 * n, rel=0.01)
    assert f.per_token / (6 * n) - 1 == pytest.approx(s / (12 * d), rel=1e-9)


def test_kaplan_full_doubles_the_context_term():
    n_layer, d, s = 4, 256, 1024
    n = 2 * d * n_layer * (2 * d + 4 * d)
    full = transformer_flops(n_layer, d, 4, s, 100, convention="kaplan", causal_attention="full")
    assert full.per_token == pytest.approx(3 * (2 * n + 4 * n_layer * s * d), rel=1e-12)


@pytest.mark.parametrize("gated_mlp", [False, True])
def test_palm_formula(gated_mlp):
    n_layer, d, h, s, v, f_ = 8, 512, 8, 2048, 32000, 1536
    q = d // h
    n = n_layer * (4 * d * d + (3 if gated_mlp else 2) * d * f_) + d * v  # matmul parameters incl. the head
    full = transformer_flops(
        n_layer, d, h, s, v, d_ff=f_, gated_mlp=gated_mlp, convention="palm", causal_attention="full"
    )
    # PaLM App. B: 6N + 12 L H Q T per token
    assert full.per_token == pytest.approx(6 * n + 12 * n_layer * h * q * s, rel=1e-12)
    half = transformer_flops(n_layer, d, h, s, v, d_ff=f_, gated_mlp=gated_mlp, convention="palm")
    assert half.per_token == pytest.approx(6 * n + 6 * n_layer * h * q * s, rel=1e-12)


def test_d_ff_defaults_to_four_d_model():
    assert transformer_flops(2, 64, 4, 32, 100).breakdown == transformer_flops(2, 64, 4, 32, 100, d_ff=256).breakdown


def test_attention_flops():
    assert attention_flops(2, 4, 16, 16, 8, causal=False) == 4 * 2 * 4 * 16 * 16 * 8
    assert attention_flops(2, 4, 16, 16, 8, causal=True) == 2 * 2 * 4 * 16 * 16 * 8
    assert attention_flops(2, 4, 16, 16, 8, causal=True, causal_attention="full") == 4 * 2 * 4 * 16 * 16 * 8
    assert attention_flops(1, 1, 3, 5, 7, causal=False) == 4 * 3 * 5 * 7


def test_gpt2_small_parameter_count():
    # GPT-2 small: V=50257, d=768, 12 layers, 1024 learned positions, tied head
    p = transformer_params(12, 768, 50257, seq_len=1024)
    assert p.total == 124_356_864  # ~124M: matrices, LayerNorms, embeddings; no linear biases
    assert p.embedding == (50257 + 1024) * 768
    assert p.non_embedding == p.total - p.embedding
    with_biases = transformer_params(12, 768, 50257, seq_len=1024, linear_biases=True)
    assert with_biases.total == 124_439_808  # the published GPT-2 small count (HF "gpt2")
    assert with_biases.non_embedding == 85_056_000


def test_untied_head_counts_as_non_embedding():
    tied = transformer_params(2, 64, 100)
    untied = transformer_params(2, 64, 100, tied_embeddings=False)
    assert untied.total - tied.total == 64 * 100
    assert untied.embedding == tied.embedding == 64 * 100
    assert untied.non_embedding - tied.non_embedding == 64 * 100


def test_gated_params():
    p = transformer_params(1, 4, 10, d_ff=6, gated_mlp=True)
    # embedding 40; layer 4*16 + 3*4*6 + LayerNorms 4*4; final LayerNorm 2*4
    assert p.total == 40 + 64 + 72 + 16 + 8


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(TINY, n_head=3), "d_model must be divisible by n_head"),
        (dict(TINY, n_layer=0), "n_layer"),
        (dict(TINY, d_model=-8), "d_model"),
        (dict(TINY, seq_len=1.5), "seq_len"),
        (dict(TINY, vocab_size=float("nan")), "vocab_size"),
        (dict(TINY, d_ff=0), "d_ff"),
        (dict(TINY, convention="gpt3"), "convention"),
        (dict(TINY, causal_attention="quarter"), "causal_attention"),
        (dict(TINY, gated_mlp="yes"), "gated_mlp"),
        (dict(TINY, causal=1), "causal"),
    ],
)
def test_transformer_flops_rejects_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        transformer_flops(**kwargs)


def test_other_functions_reject_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        transformer_params(2, 8, 0)
    with pytest.raises(ValueError, match="seq_len"):
        transformer_params(2, 8, 10, seq_len=-1)
    with pytest.raises(ValueError, match="head_dim"):
        attention_flops(1, 1, 4, 4, 0, causal=True)
    with pytest.raises(ValueError, match="causal_attention"):
        attention_flops(1, 1, 4, 4, 8, causal=True, causal_attention="none")


def test_flops_module_imports_no_torch():
    code = "import sys, lightning_scaling.flops; assert 'torch' not in sys.modules and 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_grouped_query_attention_llama3_8b_parameters():
    # Llama 3 8B: 8,030,261,248 parameters with RMSNorm weights only; our LayerNorms also count a bias per norm.
    count = transformer_params(
        32, 4096, 128256, d_ff=14336, gated_mlp=True, tied_embeddings=False, n_head=32, n_kv_head=8
    )
    assert count.total == 8_030_261_248 + (2 * 32 + 1) * 4096


def test_grouped_query_attention_flops_by_hand():
    n_layer, d, h, h_kv, s, v = 2, 64, 8, 2, 16, 100
    gqa = transformer_flops(n_layer, d, h, s, v, n_kv_head=h_kv, causal=False)
    mha = transformer_flops(n_layer, d, h, s, v, causal=False)
    k = d // h
    # Q is d x kH, K and V are d x kH_kv each (Ainslie et al. 2023): only the K/V projections shrink
    assert gqa.breakdown["qkv"] == n_layer * 2 * s * d * (k * h + 2 * k * h_kv)
    assert mha.breakdown["qkv"] - gqa.breakdown["qkv"] == n_layer * 2 * s * d * 2 * k * (h - h_kv)
    for part in ("scores", "values", "out_proj", "softmax", "mlp"):
        assert gqa.breakdown[part] == mha.breakdown[part]


def test_separate_head_dim_and_bad_groups():
    wide = transformer_flops(1, 64, 4, 8, 10, head_dim=32, causal=False)  # k·H = 128 > d_model
    assert wide.breakdown["out_proj"] == 2 * 8 * 128 * 64
    with pytest.raises(ValueError, match="n_kv_head"):
        transformer_flops(1, 64, 4, 8, 10, n_kv_head=3)
    with pytest.raises(ValueError, match="n_head"):
        transformer_params(1, 64, 10, n_kv_head=2)


# -------------------------------------------------------------------------------------------------- bad input, fuzzed


shape_ints = st.one_of(
    st.integers(min_value=1, max_value=4096),
    st.integers(min_value=-3, max_value=0),
    st.integers(min_value=1, max_value=10**400),
    st.sampled_from([1.5, 2.0, NAN, INF, "8", None, True]),
)


@FUZZ
@given(
    n_layer=shape_ints,
    d_model=shape_ints,
    n_head=shape_ints,
    seq_len=shape_ints,
    vocab=shape_ints,
    convention=st.sampled_from(["chinchilla", "kaplan", "palm", "bogus"]),
    causal_attention=st.sampled_from(["half", "full", "quarter"]),
)
# Python ints beyond 1e308 make `2.0 * s * v * d` raise OverflowError
@example(n_layer=10**400, d_model=32, n_head=2, seq_len=16, vocab=256, convention="chinchilla", causal_attention="half")
def test_transformer_flops_rejects_by_name_or_gives_finite_counts(
    n_layer, d_model, n_head, seq_len, vocab, convention, causal_attention
):
    names = ("n_layer", "d_model", "n_head", "seq_len", "vocab_size", "convention", "causal_attention")
    result = answer_or_value_error(
        lambda: transformer_flops(
            n_layer, d_model, n_head, seq_len, vocab, convention=convention, causal_attention=causal_attention
        ),
        *names,
    )
    if result is not None:
        assert_finite([result.forward, result.backward, result.total, result.per_token])
        assert result.total > 0
    params = answer_or_value_error(
        lambda: transformer_params(n_layer, d_model, vocab), "n_layer", "d_model", "vocab_size"
    )
    if params is not None:
        assert params.total > 0 and params.non_embedding >= 0


FLOPS_CALLS = {
    "attention_flops": (
        attention_flops,
        {"batch": 2, "heads": 4, "q_len": 16, "kv_len": 16, "head_dim": 8, "causal": True, "causal_attention": "half"},
    ),
    "causal_attention_factor": (causal_attention_factor, {"causal": True, "causal_attention": "full"}),
    "transformer_flops": (
        transformer_flops,
        {
            "n_layer": 2,
            "d_model": 64,
            "n_head": 4,
            "seq_len": 32,
            "vocab_size": 100,
            "d_ff": 256,
            "gated_mlp": True,
            "causal": True,
            "convention": "palm",
            "causal_attention": "half",
            "tied_embeddings": False,
            "n_kv_head": 2,
            "head_dim": 16,
        },
    ),
    "transformer_params": (
        transformer_params,
        {
            "n_layer": 2,
            "d_model": 64,
            "vocab_size": 100,
            "d_ff": 256,
            "gated_mlp": True,
            "tied_embeddings": False,
            "seq_len": 32,
            "linear_biases": True,
            "n_head": 4,
            "n_kv_head": 2,
            "head_dim": 16,
        },
    ),
}


@FUZZ
@given(
    case=st.sampled_from([(fn, arg) for fn, (_, kwargs) in FLOPS_CALLS.items() for arg in kwargs]),
    value=st.one_of(any_value, shape_ints),
)
def test_every_flops_argument_rejects_by_name_or_gives_finite_counts(case, value):
    fn_name, arg = case
    fn, kwargs = FLOPS_CALLS[fn_name]
    result = answer_or_value_error(lambda: fn(**{**kwargs, arg: value}), arg)
    if isinstance(result, (int, float)):
        assert math.isfinite(result) and result > 0
    elif result is not None:
        assert_finite(result)
        if hasattr(result, "total"):
            assert result.total > 0
