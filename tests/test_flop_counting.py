"""Measured FLOPs: the corrected FlopCounterMode (lightning_scaling.flop_counting)."""

import gpt
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lightning_scaling.flop_counting import (
    count_parameters,
    measure_training_flops,
    register_flop_formula,
    registered_flop_formulas,
    training_flop_counter,
)
from lightning_scaling.flops import CAUSAL_ATTENTION_CONVENTIONS, attention_flops, transformer_flops, transformer_params

aten = torch.ops.aten
B, H, S, D = 2, 4, 16, 8


def _sdpa_step(causal: bool, q_len: int = S, kv_len: int = S):
    torch.manual_seed(0)
    q = torch.randn(B, H, q_len, D, requires_grad=True)
    k = torch.randn(B, H, kv_len, D, requires_grad=True)
    v = torch.randn(B, H, kv_len, D, requires_grad=True)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()


def test_plain_torch_counter_misses_cpu_sdpa():
    # The reason this module exists (torch 2.13): CPU SDPA forward and backward count 0.
    with FlopCounterMode(display=False) as counter:
        _sdpa_step(causal=True)()
    assert counter.get_total_flops() == 0


@pytest.mark.parametrize("causal_attention", CAUSAL_ATTENTION_CONVENTIONS)
def test_cpu_causal_sdpa_is_three_times_attention_flops(causal_attention):
    measured = measure_training_flops(_sdpa_step(causal=True), causal_attention)
    expected = attention_flops(B, H, S, S, D, causal=True, causal_attention=causal_attention)
    assert measured.total > 0
    assert measured.total == 3 * expected  # forward + 2 x forward backward (model FLOPs)
    assert measured.forward == expected
    assert measured.backward == 2 * expected
    assert set(measured.by_op) == {"aten._scaled_dot_product_flash_attention_for_cpu",
                                   "aten._scaled_dot_product_flash_attention_for_cpu_backward"}


def test_half_is_half_of_full_for_causal_sdpa():
    half = measure_training_flops(_sdpa_step(causal=True), "half")
    full = measure_training_flops(_sdpa_step(causal=True), "full")
    assert 2 * half.total == full.total


def test_non_causal_sdpa_is_the_same_under_both_conventions():
    step = _sdpa_step(causal=False, q_len=8, kv_len=24)  # cross-attention shape, Sq != Sk
    half = measure_training_flops(step, "half")
    full = measure_training_flops(step, "full")
    assert half.total == full.total == 3 * attention_flops(B, H, 8, 24, D, causal=False)


# The CUDA SDPA ops have meta kernels, so their formulas (is_causal read from positional or keyword
# arguments) are checked here on shapes alone, without a GPU.
_M = dict(device="meta")
_q = torch.empty(B, H, S, D, **_M)
_lse = torch.empty(B, H, S, **_M)
_t = torch.empty(2, **_M)
_bshd = torch.empty(B, S, H, D, **_M)  # layout of the low-level flash/efficient ops
_SDPA_OPS = {
    "cuda_flash": lambda c: aten._scaled_dot_product_flash_attention(_q, _q, _q, 0.0, c),
    "efficient": lambda c: aten._scaled_dot_product_efficient_attention(_q, _q, _q, None, False, is_causal=c),
    "cudnn": lambda c: aten._scaled_dot_product_cudnn_attention(_q, _q, _q, None, False, 0.0, c),
    "low_level_flash": lambda c: aten._flash_attention_forward(_bshd, _bshd, _bshd, None, None, S, S, 0.0, c, False),
    "low_level_efficient": lambda c: aten._efficient_attention_forward(_bshd, _bshd, _bshd, None, None, None, S, S,
                                                                       0.0, int(c)),
}
_SDPA_BACKWARD_OPS = {
    "cpu_flash": lambda c: aten._scaled_dot_product_flash_attention_for_cpu_backward(_q, _q, _q, _q, _q, _lse, 0.0, c),
    "cuda_flash": lambda c: aten._scaled_dot_product_flash_attention_backward(_q, _q, _q, _q, _q, _lse, _t, _t, S, S,
                                                                              0.0, c, _t, _t),
    "efficient": lambda c: aten._scaled_dot_product_efficient_attention_backward(
        _q, _q, _q, _q, _q, _q, _lse, _t, _t, 0.0, [True, True, True, False], c),
    "cudnn": lambda c: aten._scaled_dot_product_cudnn_attention_backward(_q, _q, _q, _q, _q, _lse, _t, _t, _q, _t,
                                                                         _t, S, S, 0.0, c),
    "low_level_flash": lambda c: aten._flash_attention_backward(_bshd, _bshd, _bshd, _bshd, _bshd, _lse, None, None,
                                                                S, S, 0.0, c, _t, _t),
}


def _count(call, causal: bool, causal_attention: str) -> int:
    with training_flop_counter(causal_attention) as counter:
        call(causal)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(_SDPA_OPS))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("causal_attention", CAUSAL_ATTENTION_CONVENTIONS)
def test_every_sdpa_forward_op_honours_is_causal(name, causal, causal_attention):
    expected = attention_flops(B, H, S, S, D, causal=causal, causal_attention=causal_attention)
    assert _count(_SDPA_OPS[name], causal, causal_attention) == expected


@pytest.mark.parametrize("name", sorted(_SDPA_BACKWARD_OPS))
@pytest.mark.parametrize("causal_attention", CAUSAL_ATTENTION_CONVENTIONS)
def test_every_sdpa_backward_op_is_twice_forward(name, causal_attention):
    expected = 2 * attention_flops(B, H, S, S, D, causal=True, causal_attention=causal_attention)
    assert _count(_SDPA_BACKWARD_OPS[name], True, causal_attention) == expected


def _gpt_step(cfg: gpt.GPTConfig, batch_size: int = 2):
    torch.manual_seed(0)
    module = gpt.GPTLightningModule(cfg)
    batch = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1))

    def step():
        x, y = batch[:, :-1], batch[:, 1:]
        logits = module(x)
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()

    return step


GPT_BATCH = 2


@pytest.fixture(scope="module")
def gpt_measured():
    """The example GPT (default config): one forward + cross-entropy + backward, measured under each convention."""
    cfg = gpt.GPTConfig()
    return cfg, {c: measure_training_flops(_gpt_step(cfg, GPT_BATCH), c) for c in CAUSAL_ATTENTION_CONVENTIONS}


@pytest.mark.parametrize("causal_attention", CAUSAL_ATTENTION_CONVENTIONS)
def test_example_gpt_measured_within_five_percent_of_appendix_f(gpt_measured, causal_attention):
    cfg, by_convention = gpt_measured
    measured = by_convention[causal_attention]
    analytic = transformer_flops(cfg.n_layer, cfg.d_model, cfg.n_head, cfg.seq_len, cfg.vocab_size, d_ff=cfg.d_ff,
                                 gated_mlp=True, convention="chinchilla", causal_attention=causal_attention)
    ratio = measured.total / (GPT_BATCH * analytic.total)
    # measured lacks App. F's embedding (one-hot) matmul and the softmax: 0.971 for this shape
    assert 0.95 <= ratio <= 1.0
    # and exactly so: everything else App. F counts, torch (corrected) counts too
    not_measured = analytic.breakdown["embeddings"] + analytic.breakdown["softmax"]
    assert measured.total == GPT_BATCH * 3 * (analytic.forward - not_measured)
    assert measured.backward == 2 * measured.forward  # every op's backward counted as model FLOPs
    assert measured.by_op["aten._scaled_dot_product_flash_attention_for_cpu"] == cfg.n_layer * attention_flops(
        GPT_BATCH, cfg.n_head, cfg.seq_len, cfg.seq_len, cfg.d_model // cfg.n_head, True, causal_attention)


def test_example_gpt_half_and_full_differ_by_the_attention_matmuls(gpt_measured):
    cfg, by_convention = gpt_measured
    half, full = by_convention["half"], by_convention["full"]
    one_layer = attention_flops(GPT_BATCH, cfg.n_head, cfg.seq_len, cfg.seq_len, cfg.d_model // cfg.n_head, True,
                                "full")
    assert full.total - half.total == cfg.n_layer * 3 * one_layer / 2
    assert full.by_op["aten.mm"] == half.by_op["aten.mm"]


# A tiny custom op with a registered formula: the calling convention is checked call by call.
@torch.library.custom_op("ls_flop_test::scaled_matmul", mutates_args=())
def scaled_matmul(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, *, beta: float = 0.0) -> torch.Tensor:
    return alpha * (a @ b) + beta


@scaled_matmul.register_fake
def _(a, b, alpha=1.0, *, beta=0.0):
    return a.new_empty(a.shape[0], b.shape[1])


CALLS: list = []


def scaled_matmul_flops(a_shape, b_shape, *args, out_shape=None, causal_attention=None, **kwargs) -> int:
    CALLS.append((a_shape, b_shape, args, out_shape, causal_attention, kwargs))
    m, k = a_shape
    return 2 * m * k * b_shape[1] * (2 if causal_attention == "full" else 1)


register_flop_formula(scaled_matmul, scaled_matmul_flops)


@pytest.mark.parametrize("causal_attention", CAUSAL_ATTENTION_CONVENTIONS)
def test_registered_custom_op_is_counted_with_the_convention(causal_attention):
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    CALLS.clear()
    measured = measure_training_flops(lambda: scaled_matmul(a, b, alpha=2.0), causal_attention)
    assert measured.by_op == {"ls_flop_test.scaled_matmul": 2 * 4 * 8 * 3 * (2 if causal_attention == "full" else 1)}
    # alpha passed by keyword arrives positionally, in schema order (the calling convention in the docstring)
    assert CALLS == [(torch.Size([4, 8]), torch.Size([8, 3]), (2.0,), torch.Size([4, 3]), causal_attention,
                      {"beta": 0.0})]
    assert registered_flop_formulas()[torch.ops.ls_flop_test.scaled_matmul] is scaled_matmul_flops


def test_registered_op_counted_by_a_plain_flop_counter_under_the_default_convention():
    CALLS.clear()
    with FlopCounterMode(display=False) as counter:
        scaled_matmul(torch.randn(4, 8), torch.randn(8, 3), 0.5)
        scaled_matmul(torch.randn(4, 8), torch.randn(8, 3), beta=3.0)  # the dispatcher drops alpha: filled in
    assert counter.get_total_flops() == 2 * (2 * 4 * 8 * 3)
    assert [call[2:] for call in CALLS] == [((0.5,), torch.Size([4, 3]), "half", {"beta": 0.0}),
                                            ((1.0,), torch.Size([4, 3]), "half", {"beta": 3.0})]


def test_registering_again_replaces_our_formula():
    def doubled(*args, **kwargs):
        return 2 * scaled_matmul_flops(*args, **kwargs)

    try:
        register_flop_formula("ls_flop_test::scaled_matmul", doubled)
        with FlopCounterMode(display=False) as counter:
            scaled_matmul(torch.randn(4, 8), torch.randn(8, 3))
        assert counter.get_total_flops() == 4 * 4 * 8 * 3
    finally:
        register_flop_formula(scaled_matmul, scaled_matmul_flops)


def test_register_flop_formula_rejects_bad_input():
    with pytest.raises(ValueError, match="already has a FLOP formula"):
        register_flop_formula(aten.mm, scaled_matmul_flops)
    with pytest.raises(ValueError, match="op must be"):
        register_flop_formula(42, scaled_matmul_flops)
    with pytest.raises(ValueError, match="not a registered torch op"):
        register_flop_formula("ls_flop_test::no_such_op", scaled_matmul_flops)
    with pytest.raises(ValueError, match="formula"):
        register_flop_formula(scaled_matmul, "not callable")


@pytest.mark.parametrize("tied", [True, False])
def test_count_parameters_matches_transformer_params(tied):
    cfg = gpt.GPTConfig(tied_embeddings=tied)
    module = gpt.GPTLightningModule(cfg)
    expected = transformer_params(cfg.n_layer, cfg.d_model, cfg.vocab_size, d_ff=cfg.d_ff, gated_mlp=True,
                                  tied_embeddings=tied, seq_len=cfg.seq_len)
    assert count_parameters(module) == expected.total
    assert count_parameters(module, non_embedding=True) == expected.non_embedding


def test_bad_arguments():
    with pytest.raises(ValueError, match="causal_attention"):
        training_flop_counter("quarter")
    with pytest.raises(ValueError, match="causal_attention"):
        measure_training_flops(lambda: None, causal_attention="both")
    with pytest.raises(ValueError, match="fn"):
        measure_training_flops(None)
    with pytest.raises(ValueError, match="module"):
        count_parameters("model")
