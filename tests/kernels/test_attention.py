"""Fused attention: the Triton kernels (in Triton's CPU interpreter here, TRITON_INTERPRET=1 from conftest), the
op's CPU reference path, fake tensors, FLOP counting and the module, against float64 PyTorch references.

Tolerance (as FlashAttention's tests): the kernel's error against float64 must be at most twice the error of a
plain PyTorch implementation in the same precision, plus a small floor.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_equal_in_float64, assert_within_twice_torch_error, needs_interpreter
from torch.utils.flop_counter import FlopCounterMode

from lightning_scaling.kernels import triton_on_cpu
from lightning_scaling.kernels.ops import attention as attn_ops
from lightning_scaling.kernels.ops.attention import flash_attention

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4}


def plain_attention(q, k, v, causal: bool, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v with plain PyTorch ops in the inputs' own dtype (top-left causal mask; the softmax
    in fp32 for 16-bit inputs, as SDPA does, and in float64 for float64 ones); scale defaults to 1/sqrt(D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
    return torch.matmul(torch.softmax(scores.to(softmax_dtype), dim=-1).to(v.dtype), v)


def make_inputs(b, h, sq, sk, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=gen).to(dtype)
    k = torch.randn(b, h, sk, d, generator=gen).to(dtype)
    v = torch.randn(b, h, sk, d, generator=gen).to(dtype)
    grad_out = torch.randn(b, h, sq, d, generator=gen)
    return q, k, v, grad_out


def check_against_references(fn, b, h, sq, sk, d, dtype, causal) -> None:
    q, k, v, grad_out = make_inputs(b, h, sq, sk, d, dtype)
    assert_within_twice_torch_error(fn, lambda *t: plain_attention(*t, causal), [q, k, v], grad_out, FLOOR[dtype])


# --------------------------------------------------------------------------- Triton kernels (interpreter)
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq", [1, 17, 33, 64])
def test_triton_kernels_match_float64_reference(seq, causal, dtype):
    with triton_on_cpu():  # the backward kernels run too: .backward() is called inside the block
        check_against_references(
            lambda q, k, v: flash_attention(q, k, v, causal=causal), 2, 2, seq, seq, 16, dtype, causal
        )


@needs_interpreter
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("sq,sk", [(17, 40), (40, 17)])
def test_triton_kernels_cross_attention_lengths_head_dim_32(sq, sk, causal):
    with triton_on_cpu():
        check_against_references(
            lambda q, k, v: flash_attention(q, k, v, causal=causal), 1, 2, sq, sk, 32, torch.float32, causal
        )


@needs_interpreter
@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("sq,sk", [(70, 70), (45, 70), (70, 45)])
def test_triton_kernels_with_unequal_block_shapes(block_m, block_n, causal, sq, sk, monkeypatch):
    # The kernels split each loop into unmasked blocks and masked diagonal/ragged-end blocks; with unequal
    # block shapes the diagonal spans several blocks of the other side, and the split points must line up.
    import triton

    config = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=1, num_stages=1)]
    for kernel in (attn_ops._attn_fwd_kernel, attn_ops._attn_bwd_dkdv_kernel, attn_ops._attn_bwd_dq_kernel):
        monkeypatch.setattr(kernel, "configs", config)
    with triton_on_cpu():
        check_against_references(
            lambda q, k, v: flash_attention(q, k, v, causal=causal), 1, 2, sq, sk, 16, torch.float32, causal
        )


@needs_interpreter
def test_triton_kernels_take_strided_inputs_and_a_custom_scale():
    # q, k, v as the module makes them: strided views of one [B, S, 3, H, D] tensor
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 21, 3, 2, 16, generator=gen)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    with triton_on_cpu():
        out = flash_attention(q, k, v, causal=True, scale=0.3)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_triton_path_rejects_unsupported_head_dim():
    q = torch.randn(1, 1, 8, 48)
    with triton_on_cpu(), pytest.raises(ValueError, match="head_dim"):
        flash_attention(q, q, q)


# --------------------------------------------------------------------------- the op's CPU (reference) path
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cpu_path_matches_float64_reference(causal):
    check_against_references(
        lambda q, k, v: flash_attention(q, k, v, causal=causal), 2, 3, 19, 19, 24, torch.float32, causal
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cpu_path_in_float64_is_the_formula_and_passes_gradcheck(causal):
    # gradcheck alone compares the op's PyTorch backward with its own forward; the formula written here checks both.
    # The op keeps the row logsumexp in fp32 whatever the inputs' dtype, so float64 gradients are good to ~1e-7.
    q, k, v, grad_out = make_inputs(1, 2, 5, 7, 4, torch.float64)
    assert_equal_in_float64(
        lambda *t: flash_attention(*t, causal=causal),
        lambda *t: plain_attention(*t, causal),
        [q, k, v],
        grad_out,
        tolerance=1e-6,
    )
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda *t: flash_attention(*t, causal=causal), inputs)


def test_forward_returns_the_output_and_the_logsumexp_of_scaled_scores():
    q, k, v, _ = make_inputs(1, 2, 9, 9, 8, torch.float64)
    out, lse = torch.ops.lightning_scaling.flash_attention_forward(q, k, v, False, 0.5)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-2, -1) * 0.5, dim=-1).float())
    torch.testing.assert_close(out, plain_attention(q, k, v, causal=False, scale=0.5), rtol=1e-10, atol=1e-10)


def test_fake_tensors_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 4, 100, 64, dtype=torch.float16)
        k = torch.empty(2, 4, 300, 64, dtype=torch.float16)
        out, lse = torch.ops.lightning_scaling.flash_attention_forward(q, k, k, True, 0.125)
        grads = torch.ops.lightning_scaling.flash_attention_backward(out, q, k, k, out, lse, True, 0.125)
    assert out.shape == (2, 4, 100, 64) and out.dtype == torch.float16
    assert lse.shape == (2, 4, 100) and lse.dtype == torch.float32
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda q: (q[0], q, q), "q must be 4-D"),
        (lambda q: (q, q[..., :8], q), "k must be"),
        (lambda q: (q, q, q[:, :, :5]), "v must have the shape of k"),
        (lambda q: (q, q.double(), q), "k must have the dtype of q"),
        (lambda q: (q.long(), q.long(), q.long()), "q must be a floating-point"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(bad, match):
    q = torch.randn(1, 2, 6, 16)
    with pytest.raises(ValueError, match=match):
        flash_attention(*bad(q))


def test_bad_scale_raises():
    q = torch.randn(1, 2, 6, 16)
    with pytest.raises(ValueError, match="scale"):
        flash_attention(q, q, q, scale=-1.0)


# --------------------------------------------------------------------------- FLOP counting
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_flop_counters_count_forward_and_backward_at_the_formula(causal):
    from lightning_scaling.flops.counter import training_flop_counter
    from lightning_scaling.flops.formulas import attention_flops

    b, h, s, d = 2, 3, 16, 8
    q, k, v, grad_out = make_inputs(b, h, s, s, d, torch.float32)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    ops = torch.ops.lightning_scaling

    def step():
        flash_attention(q, k, v, causal=causal).backward(grad_out)

    forward = attention_flops(b, h, s, s, d, causal, "half")
    assert forward == 4 * b * h * s * s * d * (0.5 if causal else 1.0)

    with training_flop_counter() as counter:
        step()
    counts = counter.get_flop_counts()["Global"]
    assert counts[ops.flash_attention_forward] == forward
    assert counts[ops.flash_attention_backward] == 2 * forward  # model FLOPs: backward = 2 x forward
    assert counter.get_total_flops() == 3 * forward  # the reference path's inner matmuls are not counted twice
    assert counter.forward_flops == forward and counter.backward_flops == 2 * forward

    with training_flop_counter(causal_attention="full") as full_counter:
        step()
    assert full_counter.get_total_flops() == 3 * 4 * b * h * s * s * d

    with FlopCounterMode(display=False) as plain:
        step()
    assert plain.get_total_flops() == 3 * forward > 0


def test_module_flops_match_the_sdpa_block_under_training_counter():
    from gpt import CausalSelfAttention, GPTConfig

    from lightning_scaling.flops.counter import training_flop_counter
    from lightning_scaling.kernels.modules import FusedSelfAttention

    cfg = GPTConfig(d_model=32, n_head=2)
    fused, eager = FusedSelfAttention(32, 2, causal=True), CausalSelfAttention(cfg)
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 12, 32)
    totals = []
    for module in (fused, eager):
        with training_flop_counter() as counter:
            module(x).sum().backward()
        totals.append(counter.get_total_flops())
    assert totals[0] == totals[1] > 0


# --------------------------------------------------------------------------- module
def test_module_matches_example_gpt_attention_with_the_same_weights():
    from gpt import CausalSelfAttention, GPTConfig

    from lightning_scaling.kernels.modules import FusedSelfAttention

    torch.manual_seed(0)
    cfg = GPTConfig(d_model=64, n_head=4)
    eager = CausalSelfAttention(cfg)
    fused = FusedSelfAttention(64, 4, causal=True)
    fused.load_state_dict(eager.state_dict())  # same parameter names: checkpoints interchange
    x = torch.randn(2, 23, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out_f, out_e = fused(x), eager(x2)
    torch.testing.assert_close(out_f, out_e, atol=1e-5, rtol=1e-5)
    out_f.square().sum().backward()
    out_e.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for (name, p_f), p_e in zip(fused.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p_f.grad, p_e.grad, atol=1e-5, rtol=1e-5, msg=name)


@needs_interpreter
def test_module_on_triton_kernels_matches_full_attention_reference():
    from lightning_scaling.kernels.modules import FusedSelfAttention

    torch.manual_seed(0)
    fused = FusedSelfAttention(32, 2, causal=False)
    x = torch.randn(1, 19, 32)
    with triton_on_cpu():
        out = fused(x)
    b, s, d = x.shape
    q, k, v = fused.qkv(x).view(b, s, 3, 2, 16).permute(2, 0, 3, 1, 4)
    expected = fused.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_module_rejects_bad_shapes():
    from lightning_scaling.kernels.modules import FusedSelfAttention

    with pytest.raises(ValueError, match="d_model"):
        FusedSelfAttention(30, 4)
    with pytest.raises(ValueError, match="x must be"):
        FusedSelfAttention(32, 2)(torch.randn(2, 5, 16))


def test_opcheck_on_the_cpu_path():
    q, k, v, _ = make_inputs(1, 2, 5, 7, 8, torch.float32)
    ops = torch.ops.lightning_scaling
    torch.library.opcheck(ops.flash_attention_forward, (*(t.requires_grad_() for t in (q, k, v)), True, 0.3))
    out, lse = ops.flash_attention_forward(q, k, v, True, 0.3)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, True, 0.3)
    torch.library.opcheck(ops.flash_attention_backward, args)
