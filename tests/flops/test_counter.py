"""Measured FLOPs: the corrected FlopCounterMode (lightning_scaling.flops.counter)."""

import gpt
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lightning_scaling.flops import counter as flop_counting
from lightning_scaling.flops.counter import (
    count_parameters,
    measure_training_flops,
    register_flop_formula,
    registered_flop_formulas,
    training_flop_counter,
)
from lightning_scaling.flops.formulas import (
    CAUSAL_ATTENTION_CONVENTIONS,
    attention_flops,
    transformer_flops,
    transformer_params,
)

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
    assert set(measured.by_op) == {
        "aten._scaled_dot_product_flash_attention_for_cpu",
        "aten._scaled_dot_product_flash_attention_for_cpu_backward",
    }


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
    "low_level_efficient": lambda c: aten._efficient_attention_forward(
        _bshd, _bshd, _bshd, None, None, None, S, S, 0.0, int(c)
    ),
}


_SDPA_BACKWARD_OPS = {
    "cpu_flash": lambda c: aten._scaled_dot_product_flash_attention_for_cpu_backward(_q, _q, _q, _q, _q, _lse, 0.0, c),
    "cuda_flash": lambda c: aten._scaled_dot_product_flash_attention_backward(
        _q, _q, _q, _q, _q, _lse, _t, _t, S, S, 0.0, c, _t, _t
    ),
    "efficient": lambda c: aten._scaled_dot_product_efficient_attention_backward(
        _q, _q, _q, _q, _q, _q, _lse, _t, _t, 0.0, [True, True, True, False], c
    ),
    "cudnn": lambda c: aten._scaled_dot_product_cudnn_attention_backward(
        _q, _q, _q, _q, _q, _lse, _t, _t, _q, _t, _t, S, S, 0.0, c
    ),
    "low_level_flash": lambda c: aten._flash_attention_backward(
        _bshd, _bshd, _bshd, _bshd, _bshd, _lse, None, None, S, S, 0.0, c, _t, _t
    ),
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
    analytic = transformer_flops(
        cfg.n_layer,
        cfg.d_model,
        cfg.n_head,
        cfg.seq_len,
        cfg.vocab_size,
        d_ff=cfg.d_ff,
        gated_mlp=True,
        convention="chinchilla",
        causal_attention=causal_attention,
    )
    ratio = measured.total / (GPT_BATCH * analytic.total)
    # measured lacks App. F's embedding (one-hot) matmul and the softmax: 0.971 for this shape
    assert 0.95 <= ratio <= 1.0
    # and exactly so: everything else App. F counts, torch (corrected) counts too
    not_measured = analytic.breakdown["embeddings"] + analytic.breakdown["softmax"]
    assert measured.total == GPT_BATCH * 3 * (analytic.forward - not_measured)
    assert measured.backward == 2 * measured.forward  # every op's backward counted as model FLOPs
    assert measured.by_op["aten._scaled_dot_product_flash_attention_for_cpu"] == cfg.n_layer * attention_flops(
        GPT_BATCH, cfg.n_head, cfg.seq_len, cfg.seq_len, cfg.d_model // cfg.n_head, True, causal_attention
    )


def test_example_gpt_half_and_full_differ_by_the_attention_matmuls(gpt_measured):
    cfg, by_convention = gpt_measured
    half, full = by_convention["half"], by_convention["full"]
    one_layer = attention_flops(
        GPT_BATCH, cfg.n_head, cfg.seq_len, cfg.seq_len, cfg.d_model // cfg.n_head, True, "full"
    )
    assert full.total - half.total == cfg.n_layer * 3 * one_layer / 2
    assert full.by_op["aten.mm"] == half.by_op["aten.mm"]
    # the attention split: the SDPA calls, and nothing of the projections, MLP or head
    assert half.attention_flops[0] == cfg.n_layer * 3 * one_layer / 2
    assert full.attention_flops[0] == cfg.n_layer * 3 * one_layer
    not_attention = sum(n for op, n in half.by_op.items() if "attention" not in op)
    assert half.total - half.attention_flops[0] == full.total - full.attention_flops[0] == not_attention


def test_a_registered_op_is_attention_only_when_registered_so():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    assert measure_training_flops(lambda: scaled_matmul(a, b)).attention_flops == (0, 0)
    try:
        register_flop_formula(scaled_matmul, scaled_matmul_flops, attention=True)
        measured = measure_training_flops(lambda: scaled_matmul(a, b))
        assert measured.attention_flops == (measured.total, measured.hardware) == (2 * 4 * 8 * 3, 2 * 4 * 8 * 3)
    finally:
        register_flop_formula(scaled_matmul, scaled_matmul_flops)
    assert measure_training_flops(lambda: scaled_matmul(a, b)).attention_flops == (0, 0)


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
    # (under "full" a second call, under "half", gives the hardware FLOPs: what a causal kernel computes)
    conventions = [causal_attention] if causal_attention == "half" else [causal_attention, "half"]
    assert [
        (torch.Size([4, 8]), torch.Size([8, 3]), (2.0,), torch.Size([4, 3]), convention, {"beta": 0.0})
        for convention in conventions
    ] == CALLS
    assert measured.hardware == 2 * 4 * 8 * 3
    assert registered_flop_formulas()[torch.ops.ls_flop_test.scaled_matmul] is scaled_matmul_flops


def test_registered_op_counted_by_a_plain_flop_counter_under_the_default_convention():
    CALLS.clear()
    with FlopCounterMode(display=False) as counter:
        scaled_matmul(torch.randn(4, 8), torch.randn(8, 3), 0.5)
        scaled_matmul(torch.randn(4, 8), torch.randn(8, 3), beta=3.0)  # the dispatcher drops alpha: filled in
    assert counter.get_total_flops() == 2 * (2 * 4 * 8 * 3)
    assert [call[2:] for call in CALLS] == [
        ((0.5,), torch.Size([4, 3]), "half", {"beta": 0.0}),
        ((1.0,), torch.Size([4, 3]), "half", {"beta": 3.0}),
    ]


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
    with pytest.raises(ValueError, match="attention must be True or False"):
        register_flop_formula(scaled_matmul, scaled_matmul_flops, attention="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("tied", [True, False])
def test_count_parameters_matches_transformer_params(tied):
    cfg = gpt.GPTConfig(tied_embeddings=tied)
    module = gpt.GPTLightningModule(cfg)
    expected = transformer_params(
        cfg.n_layer,
        cfg.d_model,
        cfg.vocab_size,
        d_ff=cfg.d_ff,
        gated_mlp=True,
        tied_embeddings=tied,
        seq_len=cfg.seq_len,
    )
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


def test_hardware_formula_is_used_for_hardware_flops_only():
    calls = []

    def model_flops(a, b, *args, out_shape=None, causal_attention=None, **kwargs):
        return 2 * a[0] * a[1] * b[1]

    def hardware_flops(a, b, *args, out_shape=None, **kwargs):  # no causal_attention: not a convention
        calls.append(kwargs)
        return 3 * 2 * a[0] * a[1] * b[1]  # e.g. a backward that recomputes

    register_flop_formula("ls_flop_test::scaled_matmul", model_flops, hardware_formula=hardware_flops)
    try:
        measured = measure_training_flops(lambda: scaled_matmul(torch.randn(4, 8), torch.randn(8, 3)), "full")
        assert measured.total == 2 * 4 * 8 * 3
        assert measured.hardware == 3 * measured.total
        assert calls == [{"beta": 0.0}]
    finally:
        register_flop_formula(scaled_matmul, scaled_matmul_flops)  # the formula the tests above use
    with pytest.raises(ValueError, match="hardware_formula must be callable"):
        register_flop_formula(scaled_matmul, scaled_matmul_flops, hardware_formula=3)


# ------------------------------------------------------------------------------------------------------------
# One attention convention on every path: masks given to SDPA, eager attention, flex attention.
# ------------------------------------------------------------------------------------------------------------
_CAUSAL = torch.ones(S, S, dtype=torch.bool).tril()


_KEYS = torch.ones(B, S, dtype=torch.bool)


_KEYS[1, -5:] = False  # right padding in the second sequence


_LEFT_KEYS = torch.ones(B, S, dtype=torch.bool)


_LEFT_KEYS[1, :5] = False


def _additive(allowed: torch.Tensor, masked_value: float) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, masked_value)


def _left_padded_with_whole_rows() -> torch.Tensor:
    # what some libraries pass for left padding: padded queries' rows allow every key (avoids NaN rows)
    mask = _CAUSAL & _LEFT_KEYS[:, None, None, :]
    mask[1, :, :5, :] = True
    return mask


CAUSAL_MASKS = {
    "bool": lambda: _CAUSAL,
    "bool, right padding folded in": lambda: _CAUSAL & _KEYS[:, None, None, :],
    "bool, left padding, whole padded rows": _left_padded_with_whole_rows,
    "additive -inf": lambda: _additive(_CAUSAL, float("-inf")),
    "additive dtype min, padding": lambda: _additive(_CAUSAL & _KEYS[:, None, None, :], torch.finfo(torch.float32).min),
    "bool, expanded over heads": lambda: (_CAUSAL & _KEYS[:, None, None, :]).expand(B, H, S, S),
    "sliding window": lambda: _CAUSAL & ~torch.ones(S, S, dtype=torch.bool).tril(-4),
    "packed documents": lambda: _CAUSAL & torch.block_diag(torch.ones(6, 6), torch.ones(10, 10)).bool(),
}


def _prefix_lm() -> torch.Tensor:
    mask = _CAUSAL.clone()
    mask[:4, :4] = True  # the prefix sees itself both ways
    return mask


def _one_leak() -> torch.Tensor:
    mask = _CAUSAL.clone()
    mask[3, 9] = True
    return mask


NON_CAUSAL_MASKS = {
    "padding only (bidirectional)": lambda: _KEYS[:, None, None, :].expand(B, 1, S, S),
    "padding broadcast over queries": lambda: _KEYS[:, None, None, :],
    "prefix LM": _prefix_lm,
    "one query sees a later key": _one_leak,
    "all allowed": lambda: torch.ones(S, S, dtype=torch.bool),
}


def _masked_sdpa_step(mask):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(3))
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()


def _full_square_hardware() -> int:
    # forward: the full square; backward: scores recomputed, dV, dP, dQ, dK = 2.5 x forward
    forward = attention_flops(B, H, S, S, D, causal=False)
    return int(forward + 2.5 * forward)


@pytest.mark.parametrize("name", sorted(CAUSAL_MASKS))
def test_sdpa_with_a_causal_mask_counts_like_is_causal(name):
    measured = measure_training_flops(_masked_sdpa_step(CAUSAL_MASKS[name]()))
    flagged = measure_training_flops(_sdpa_step(causal=True))
    assert measured.total == flagged.total == 3 * attention_flops(B, H, S, S, D, causal=True)
    assert measured.attention == {"fused:causal_mask": 1}
    assert flagged.attention == {"fused:causal": 1}
    # hardware: a masked kernel computes the whole square; one told is_causal skips the upper triangle
    assert measured.hardware == _full_square_hardware()
    assert flagged.hardware == _full_square_hardware() // 2
    # nothing but attention ran: all of it is the part quadratic in the sequence length
    assert measured.attention_flops == (measured.total, measured.hardware)
    assert flagged.attention_flops == (flagged.total, flagged.hardware)


@pytest.mark.parametrize("name", sorted(NON_CAUSAL_MASKS))
def test_sdpa_with_a_non_causal_mask_counts_in_full(name):
    measured = measure_training_flops(_masked_sdpa_step(NON_CAUSAL_MASKS[name]()))
    assert measured.total == 3 * attention_flops(B, H, S, S, D, causal=False)
    assert measured.attention == {"fused:full": 1}


def test_masks_of_one_layout_with_other_values_get_their_own_verdict():
    # torch's SDPA hands each layer a new mask tensor: an equal one reuses the verdict, another is checked
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(3))
    causal, full = CAUSAL_MASKS["bool"](), torch.ones(S, S, dtype=torch.bool)

    def step():
        out = sum(F.scaled_dot_product_attention(q, k, v, attn_mask=m.clone()) for m in (causal, full, causal))
        out.sum().backward()

    measured = measure_training_flops(step)
    assert measured.attention == {"fused:causal_mask": 2, "fused:full": 1}


def test_a_mask_changed_in_place_is_checked_again():
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    mask = torch.zeros(S, S).masked_fill(~CAUSAL_MASKS["bool"](), float("-inf"))  # additive: reaches the op as is
    counter = flop_counting.training_flop_counter()
    with counter:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        mask.zero_()  # now every query sees every key
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert counter.attention_calls == {"fused:causal_mask": 1, "fused:full": 1}


def test_huge_masks_are_checked_on_a_strided_sample_of_rows(monkeypatch):
    monkeypatch.setattr(flop_counting, "MASK_CHECK_ELEMENTS", 3 * S)  # three rows of S keys
    mask = (_CAUSAL & _KEYS[:, None, None, :]).expand(B, H, S, S)
    rows, query = flop_counting._sample_rows(mask)
    assert rows.shape == (3, S)
    assert query.tolist() == [0, (2 * S - 1) // 2 % S, S - 1]  # first, middle and last row of batch x queries
    causal = measure_training_flops(_masked_sdpa_step(mask))
    assert causal.attention == {"fused:causal_mask": 1}
    leak = _CAUSAL.clone()
    leak[0, 1] = True  # in the first row, which the sample always reads
    assert measure_training_flops(_masked_sdpa_step(leak)).attention == {"fused:full": 1}


def test_a_mask_whose_values_cannot_be_read_counts_in_full():
    # meta tensors (no values): not recognised, so counted in full rather than guessed
    with training_flop_counter("half") as counter:
        aten._scaled_dot_product_efficient_attention(_q, _q, _q, torch.zeros(S, S, **_M), False, is_causal=False)
    assert counter.get_total_flops() == attention_flops(B, H, S, S, D, causal=False)
    assert counter.attention_calls == {"fused:full": 1}


@pytest.mark.parametrize("op", [aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention])
def test_cuda_sdpa_ops_read_their_attn_bias(op):
    # The CUDA ops cannot run here: their formulas are called directly with CPU tensors (the mask is read).
    q = torch.randn(B, H, S, D)
    # efficient attention pads the bias's last dimension to a multiple of 16 and slices it back; heads broadcast
    padded = torch.zeros(B, 1, S, 32).masked_fill(~torch.ones(S, 32, dtype=torch.bool).tril(), float("-inf"))
    bias = padded[..., :S].expand(B, H, S, S)
    for half, expected in (
        (False, attention_flops(B, H, S, S, D, causal=False)),
        (True, attention_flops(B, H, S, S, D, causal=True)),
    ):
        counter = training_flop_counter("half")
        args = [q, q, q, bias if half else None, False]
        counter._count_flops(op, None, tuple(args), {})
        assert counter.get_total_flops() == expected
        assert counter.hardware_flops == attention_flops(B, H, S, S, D, causal=False)


def _eager_attention(
    q, k, v, mask=None, dropout=0.0, mask_after_softmax=False, softcap=None, baddbmm=False, key_padding=None
):
    scale = q.shape[-1] ** -0.5
    if baddbmm:  # 3-D, as older GPT-NeoX/Bloom code does: baddbmm(bias, Q, Kᵀ)
        b, h, s, d = q.shape
        bias = torch.zeros(b * h, s, s).masked_fill(~mask, float("-inf")) if mask is not None else torch.zeros(1)
        scores = torch.baddbmm(bias, q.reshape(b * h, s, d), k.reshape(b * h, s, d).transpose(1, 2), alpha=scale)
        probs = scores.softmax(-1)
        return torch.bmm(probs, v.reshape(b * h, s, d)).reshape(b, h, s, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None and not mask_after_softmax:
        scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    if key_padding is not None:  # Hugging Face 4.x: (1 - mask) * dtype min added after the causal mask
        scores = scores + (1.0 - key_padding[:, None, None, :].float()) * torch.finfo(scores.dtype).min
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if mask is not None and mask_after_softmax:
        probs = probs * mask
        probs = probs / probs.sum(-1, keepdim=True)
    probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, v)


def _eager_step(checkpoint: bool = False, zero_queries: bool = False, **options):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(3))
    if zero_queries:  # e.g. a zero-initialised query projection (muP): every probability in a row is equal
        q = torch.zeros(B, H, S, D, requires_grad=True)

    def step():
        if checkpoint:
            out = torch.utils.checkpoint.checkpoint(_eager_attention, q, k, v, use_reentrant=False, **options)
        else:
            out = _eager_attention(q, k, v, **options)
        (out * out).sum().backward()

    return step


EAGER_CAUSAL = {
    "mask": dict(mask=_CAUSAL),
    "mask and dropout": dict(mask=_CAUSAL, dropout=0.3),
    "mask with padding, dropout": dict(mask=_CAUSAL & _LEFT_KEYS[:, None, None, :], dropout=0.1),
    "mask after the softmax": dict(mask=_CAUSAL, mask_after_softmax=True),
    "softcapped scores": dict(mask=_CAUSAL, softcap=30.0),
    "baddbmm": dict(mask=_CAUSAL, baddbmm=True),
    "left padding added after the causal mask": dict(mask=_CAUSAL, key_padding=_LEFT_KEYS, dropout=0.1),
    "zero queries": dict(mask=_CAUSAL, zero_queries=True),
}


@pytest.mark.parametrize("name", sorted(EAGER_CAUSAL))
def test_eager_causal_attention_counts_like_sdpa(name):
    measured = measure_training_flops(_eager_step(**EAGER_CAUSAL[name]))
    assert measured.total == 3 * attention_flops(B, H, S, S, D, causal=True)
    assert measured.backward == 2 * measured.forward
    assert measured.attention == {"eager:causal_mask": 1}
    # hardware: the matmuls computed the full square, and the backward recomputes nothing
    assert measured.hardware == 3 * attention_flops(B, H, S, S, D, causal=False)
    # the six matmuls (scores, P·V, dV, dP, dQ, dK) are all attention's
    assert measured.attention_flops == (measured.total, measured.hardware)


@pytest.mark.parametrize(
    "options",
    [{}, dict(dropout=0.2), dict(mask=_KEYS[:, None, None, :]), dict(key_padding=_KEYS, zero_queries=True)],
    ids=["no mask", "dropout", "padding only", "padding only, zero queries"],
)
def test_eager_non_causal_attention_counts_in_full(options):
    measured = measure_training_flops(_eager_step(**options))
    assert measured.total == 3 * attention_flops(B, H, S, S, D, causal=False)
    assert measured.attention == {"eager:full": 1}
    assert measured.attention_flops == (measured.total, measured.hardware)


def test_eager_attention_under_full_is_the_whole_square():
    measured = measure_training_flops(_eager_step(mask=_CAUSAL), "full")
    assert measured.total == 3 * attention_flops(B, H, S, S, D, causal=True, causal_attention="full")


def test_activation_checkpointing_recomputation_is_hardware_flops():
    plain = measure_training_flops(_eager_step(mask=_CAUSAL))
    recomputed = measure_training_flops(_eager_step(checkpoint=True, mask=_CAUSAL))
    assert recomputed.forward == plain.forward
    # The recomputed forward (torch stops it once the saved tensors are back: here after the softmax) lands
    # in the backward, recognised as causal there too: half in model FLOPs, the full square in hardware FLOPs.
    extra = recomputed.backward - plain.backward
    assert 0 < extra <= plain.forward
    assert recomputed.hardware - plain.hardware == 2 * extra
    # model FLOPs of the step: forward + at most 2 x forward
    assert recomputed.forward + min(recomputed.backward, 2 * recomputed.forward) == plain.total


def test_the_counter_forgets_its_tracking_between_uses():
    counter = training_flop_counter("half")
    for _ in range(2):
        with counter:
            _eager_step(mask=_CAUSAL)()
        assert counter.get_total_flops() == 3 * attention_flops(B, H, S, S, D, causal=True)
        assert counter.attention_calls == {"eager:causal_mask": 1}
        assert counter._tags == {}


flex = pytest.importorskip("torch.nn.attention.flex_attention", reason="torch without flex attention")


@pytest.fixture
def eager_flex(monkeypatch):
    # torch 2.13 wraps eager flex_attention in torch.compile(fullgraph=True), which refuses to run under any
    # dispatch mode (a FLOP counter included); its debug switch calls the operator directly. CPU: forward only.
    monkeypatch.setattr(flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


FLEX_S = 256  # two 128-blocks each way


@pytest.mark.parametrize(
    "name, mask_mod, causal, computed_blocks",
    [
        ("causal", lambda b, h, q, kv: q >= kv, True, 3),
        ("causal, packed documents", lambda b, h, q, kv: (q >= kv) & (q // 100 == kv // 100), True, 3),
        ("sliding window, both ways", lambda b, h, q, kv: (q - kv).abs() < 16, False, 4),
        ("none", None, False, 4),
    ],
)
def test_flex_attention_reads_its_mask_mod(eager_flex, name, mask_mod, causal, computed_blocks):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, FLEX_S, D) for _ in range(3))
    block_mask = None if mask_mod is None else flex.create_block_mask(mask_mod, 1, 2, FLEX_S, FLEX_S, device="cpu")
    with training_flop_counter("half") as counter:
        flex.flex_attention(q, k, v, block_mask=block_mask)
    assert counter.get_total_flops() == attention_flops(1, 2, FLEX_S, FLEX_S, D, causal=causal)
    assert counter.attention_calls == {"flex:causal_mask" if causal else "flex:full": 1}
    # hardware: the blocks the block mask keeps (of 4)
    assert counter.hardware_flops == attention_flops(1, 2, FLEX_S, FLEX_S, D, causal=False) * computed_blocks // 4
