"""The Triton kernels compiled on a CUDA GPU: bf16 (wrong in the interpreter), realistic shapes, autotuning,
``torch.library.opcheck`` on the Triton path and ``torch.compile``. Every test skips without a CUDA GPU.

Tolerance as in the CPU tests (and FlashAttention's): error against float64 at most twice that of plain PyTorch
in the same precision, plus a small floor.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_checks import assert_within_twice_torch_error as _within_twice

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_within_twice_torch_error(fn, reference, tensors, grad_out, dtype) -> None:
    _within_twice(fn, reference, tensors, grad_out, FLOOR[dtype])


def plain_attention(q, k, v, causal: bool) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)  # float64 stays float64: the exact run
    return torch.matmul(torch.softmax(scores.to(softmax_dtype), dim=-1).to(v.dtype), v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq", [1, 113, 1000, 2048])
def test_attention_kernels_match_float64_reference(seq, causal, head_dim, dtype):
    from lightning_scaling.kernels.ops.attention import flash_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad_out = (torch.randn(2, 4, seq, head_dim, device="cuda", generator=gen) for _ in range(4))
    assert_within_twice_torch_error(
        lambda *t: flash_attention(*t, causal=causal),
        lambda *t: plain_attention(*t, causal),
        [t.to(dtype) for t in (q, k, v)],
        grad_out,
        dtype,
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("sq,sk", [(300, 1029), (1029, 300)])
def test_attention_kernels_cross_lengths_bf16(sq, sk, causal):
    from lightning_scaling.kernels.ops.attention import flash_attention

    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, 2, sq, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, sk, 64, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    grad_out = torch.randn(1, 2, sq, 64, device="cuda", generator=gen)
    assert_within_twice_torch_error(
        lambda *t: flash_attention(*t, causal=causal),
        lambda *t: plain_attention(*t, causal),
        [q, k, v],
        grad_out,
        torch.bfloat16,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_swiglu_kernels_match_float64_reference(dtype):
    from lightning_scaling.kernels.ops.swiglu import swiglu

    gen = torch.Generator(device="cuda").manual_seed(0)
    gate, up, grad_out = (4 * torch.randn(4, 1000, 2731, device="cuda", generator=gen) for _ in range(3))
    assert_within_twice_torch_error(
        swiglu, lambda g, u: torch.nn.functional.silu(g) * u, [gate.to(dtype), up.to(dtype)], grad_out, dtype
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("tokens,d_model,d_ff", [(4096, 1024, 2816), (1000, 520, 1000)])  # tails in every dim
def test_swiglu_gemm_kernels_match_float64_reference(tokens, d_model, d_ff, dtype):
    from lightning_scaling.kernels.ops.swiglu_gemm import swiglu_gate_up

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, d_model, device="cuda", generator=gen)
    w_gate, w_up = (torch.randn(d_ff, d_model, device="cuda", generator=gen) / d_model**0.5 for _ in range(2))
    grad_out = torch.randn(tokens, d_ff, device="cuda", generator=gen)

    def eager(x, w_gate, w_up):
        return torch.nn.functional.silu(x @ w_gate.t()) * (x @ w_up.t())

    assert_within_twice_torch_error(swiglu_gate_up, eager, [t.to(dtype) for t in (x, w_gate, w_up)], grad_out, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_swiglu_mlp_matches_float64_reference(dtype):
    from lightning_scaling.kernels.ops.swiglu_mlp import swiglu_mlp

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 1024, device="cuda", generator=gen)
    w_gate, w_up = (torch.randn(2816, 1024, device="cuda", generator=gen) / 32 for _ in range(2))
    w_down = torch.randn(1024, 2816, device="cuda", generator=gen) / 2816**0.5
    grad_out = torch.randn(4096, 1024, device="cuda", generator=gen)

    def eager(x, w_gate, w_up, w_down):
        return (torch.nn.functional.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()

    assert_within_twice_torch_error(
        swiglu_mlp, eager, [t.to(dtype) for t in (x, w_gate, w_up, w_down)], grad_out, dtype
    )


def test_opcheck_attention_ops_on_the_triton_path():
    ops = torch.ops.lightning_scaling
    q, k, v = (torch.randn(2, 3, 77, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(ops.flash_attention_forward, (q, k, v, True, 0.125))
    out, lse = ops.flash_attention_forward(q, k, v, True, 0.125)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, True, 0.125)
    torch.library.opcheck(ops.flash_attention_backward, args)


def test_opcheck_swiglu_ops_on_the_triton_path():
    ops = torch.ops.lightning_scaling
    gate, up = (torch.randn(33, 257, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    torch.library.opcheck(ops.swiglu_forward, (gate, up))
    torch.library.opcheck(ops.swiglu_backward, (torch.randn_like(gate), gate.detach(), up.detach()))


def test_opcheck_swiglu_mlp_ops_on_the_triton_path():
    ops = torch.ops.lightning_scaling
    x = torch.randn(33, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_gate, w_up = (torch.randn(200, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    w_down = torch.randn(128, 200, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(ops.swiglu_mlp_forward, (x, w_gate, w_up, w_down))
    _, g, u = ops.swiglu_mlp_forward(x, w_gate, w_up, w_down)
    args = (
        torch.randn(33, 128, device="cuda", dtype=torch.bfloat16),
        x.detach(),
        w_gate.detach(),
        w_up.detach(),
        w_down.detach(),
        g,
        u,
    )
    torch.library.opcheck(ops.swiglu_mlp_backward, args)


def test_opcheck_swiglu_gemm_ops_on_the_triton_path():
    ops = torch.ops.lightning_scaling
    x = torch.randn(33, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_gate, w_up = (torch.randn(200, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    torch.library.opcheck(ops.swiglu_gate_up_forward, (x, w_gate, w_up))
    args = (torch.randn(33, 200, device="cuda", dtype=torch.bfloat16), x.detach(), w_gate.detach(), w_up.detach())
    torch.library.opcheck(ops.swiglu_gate_up_backward, args)


@pytest.mark.parametrize("fusion", ["elementwise", "gemm"])
def test_torch_compile_of_the_fused_block_matches_eager(fusion):
    from lightning_scaling.kernels.modules import FusedSelfAttention, FusedSwiGLU

    torch.manual_seed(0)
    block = torch.nn.Sequential(FusedSelfAttention(256, 4), FusedSwiGLU(256, 683, fusion=fusion))
    block = block.cuda().to(torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_eager, out_compiled = block(x_eager), compiled(x_compiled)
    torch.testing.assert_close(out_compiled, out_eager, atol=2e-2, rtol=2e-2)
    out_eager.float().square().sum().backward()
    out_compiled.float().square().sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, atol=5e-2, rtol=5e-2)


def test_modules_match_example_gpt_blocks_in_bf16():
    from gpt import CausalSelfAttention, GPTConfig, SwiGLU

    from lightning_scaling.kernels.modules import FusedSelfAttention, FusedSwiGLU

    cfg = GPTConfig(d_model=512, n_head=8, d_ff=1365)
    torch.manual_seed(0)
    for eager, fused in (
        (CausalSelfAttention(cfg), FusedSelfAttention(512, 8)),
        (SwiGLU(cfg), FusedSwiGLU(512, 1365)),
        (SwiGLU(cfg), FusedSwiGLU(512, 1365, fusion="gemm")),
    ):
        fused.load_state_dict(eager.state_dict())
        eager, fused = eager.cuda().bfloat16(), fused.cuda().bfloat16()
        x = torch.randn(4, 1024, 512, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(fused(x), eager(x), atol=2e-2, rtol=2e-2)


def test_example_gpt_uses_the_kernels_on_cuda_and_trains():
    from gpt import GPT, GPTConfig, kernels_available

    assert kernels_available()
    cfg = GPTConfig(seq_len=256, d_model=256, n_head=4, d_ff=683)
    torch.manual_seed(0)
    model = GPT(cfg, use_kernels=True).cuda()
    idx = torch.randint(0, 256, (4, 257), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
