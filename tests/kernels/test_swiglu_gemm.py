"""Fused gate/up GEMM with the SwiGLU epilogue: the Triton kernels (in Triton's CPU interpreter here), the op's
CPU reference path, fake tensors, what it saves for backward, FLOP counting and ``FusedSwiGLU(fusion="gemm")``,
against float64 PyTorch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import (
    assert_equal_in_float64,
    assert_within_twice_torch_error,
    eager_and_fused_swiglu,
    needs_interpreter,
    run_with_grads,
    saved_activation_bytes,
)

from lightning_scaling.kernels import triton_on_cpu
from lightning_scaling.kernels.ops.swiglu_gemm import swiglu_gate_up

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3}


def eager_gate_up(x, w_gate, w_up):
    return F.silu(x @ w_gate.t()) * (x @ w_up.t())


def make_inputs(tokens, d_model, d_ff, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_model, generator=gen)
    w_gate, w_up = (torch.randn(d_ff, d_model, generator=gen) / d_model**0.5 for _ in range(2))
    grad_out = torch.randn(tokens, d_ff, generator=gen)
    return [t.to(dtype) for t in (x, w_gate, w_up)], grad_out


def check_against_references(tokens, d_model, d_ff, dtype) -> None:
    tensors, grad_out = make_inputs(tokens, d_model, d_ff, dtype)
    assert_within_twice_torch_error(swiglu_gate_up, eager_gate_up, tensors, grad_out, FLOOR[dtype])


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "tokens,d_model,d_ff",
    [
        (16, 32, 16),  # whole blocks (EVEN_K)
        (37, 48, 40),  # tails in every dimension: rows and columns wrap, K is masked
        (1, 20, 70),  # one token
    ],
)
def test_triton_kernels_match_float64_reference(tokens, d_model, d_ff, dtype):
    with triton_on_cpu():
        check_against_references(tokens, d_model, d_ff, dtype)


@needs_interpreter
def test_triton_kernels_take_strided_and_batched_inputs():
    (x, w_gate, w_up), _ = make_inputs(24, 32, 40, torch.float32)
    x_strided = x.t().contiguous().t()  # column-major view: stride (1, 24)
    x_batched = x.view(2, 12, 32)
    with triton_on_cpu():
        out_strided = swiglu_gate_up(x_strided, w_gate, w_up)
        out_batched = swiglu_gate_up(x_batched, w_gate, w_up)
    expected = eager_gate_up(x, w_gate, w_up)
    torch.testing.assert_close(out_strided, expected)
    assert out_batched.shape == (2, 12, 40)
    torch.testing.assert_close(out_batched.reshape(24, 40), expected)


@needs_interpreter
def test_triton_kernels_write_every_output_element(monkeypatch):
    # Outputs are allocated NaN-poisoned: a tile the launch grid missed would show through.
    from lightning_scaling.kernels.ops import swiglu_gemm

    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))
    (x, w_gate, w_up), grad_out = make_inputs(37, 48, 40, torch.float32)
    with triton_on_cpu():
        h = swiglu_gemm._triton_forward(x, w_gate, w_up)
        d_gate, d_up = swiglu_gemm._triton_gate_up_grads(grad_out, x, w_gate, w_up)
    monkeypatch.undo()
    assert h.shape == (37, 40) and d_gate.shape == d_up.shape == (37, 40)
    for t in (h, d_gate, d_up):
        assert not torch.isnan(t).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cpu_path_matches_float64_reference(dtype):
    check_against_references(9, 24, 40, dtype)


def test_cpu_path_in_float64_is_the_formula_and_passes_gradcheck():
    # gradcheck alone compares the op's PyTorch backward with its own forward; the formula written here checks both
    (x, w_gate, w_up), grad_out = make_inputs(4, 5, 6, torch.float64)
    assert_equal_in_float64(swiglu_gate_up, eager_gate_up, [x, w_gate, w_up], grad_out)
    assert torch.autograd.gradcheck(swiglu_gate_up, [t.requires_grad_() for t in (x, w_gate, w_up)])


def test_saves_only_the_input_and_weights_for_backward():
    (x, w_gate, w_up), _ = make_inputs(8, 16, 24, torch.float32)
    for t in (x, w_gate, w_up):
        t.requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu_gate_up(x, w_gate, w_up)
    assert {t.untyped_storage().data_ptr() for t in saved} == {
        t.untyped_storage().data_ptr() for t in (x, w_gate, w_up)
    }


def test_fake_tensors_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4096, 1024, dtype=torch.bfloat16)
        w = torch.empty(2816, 1024, dtype=torch.bfloat16)
        h = torch.ops.lightning_scaling.swiglu_gate_up_forward(x, w, w)
        d_x, d_wg, d_wu = torch.ops.lightning_scaling.swiglu_gate_up_backward(h, x, w, w)
    assert h.shape == (4096, 2816) and h.dtype == torch.bfloat16
    assert d_x.shape == x.shape and d_wg.shape == d_wu.shape == w.shape


def test_opcheck_on_the_cpu_path():
    (x, w_gate, w_up), grad_out = make_inputs(5, 12, 20, torch.float32)
    ops = torch.ops.lightning_scaling
    torch.library.opcheck(ops.swiglu_gate_up_forward, [t.requires_grad_() for t in (x, w_gate, w_up)])
    torch.library.opcheck(ops.swiglu_gate_up_backward, (grad_out, x.detach(), w_gate.detach(), w_up.detach()))


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(3, 4), torch.randn(6, 5), torch.randn(6, 5)), "w_gate must be"),
        ((torch.randn(3, 4), torch.randn(6, 4), torch.randn(5, 4)), "w_up must have the shape of w_gate"),
        ((torch.randn(3, 4), torch.randn(6, 4).double(), torch.randn(6, 4)), "w_gate must have the dtype of x"),
        ((torch.ones(3, 4, dtype=torch.long), torch.randn(6, 4), torch.randn(6, 4)), "x must be a floating-point"),
        ((torch.randn(0, 4), torch.randn(6, 4), torch.randn(6, 4)), "x must hold at least one token"),
        (([1.0], torch.randn(6, 4), torch.randn(6, 4)), "x must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        swiglu_gate_up(*args)


# ---------------------------------------------------------------------------------------------- the module
# (tests/kernels/test_swiglu.py checks both fusions against eager with the same weights, on the CPU path and
# the Triton kernels, and their FLOP counts)
def _eager_and_fused(d_model=32, d_ff=80):
    return eager_and_fused_swiglu(d_model, d_ff, fusion="gemm")


def test_module_follows_autocast_like_the_eager_mlp():
    # Under autocast nn.Linear computes in bf16 from fp32 weights; the fused op must cast the same way rather
    # than refuse the mixed dtypes.
    eager, fused = _eager_and_fused()
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_f, out_e = fused(x), eager(x)
    assert out_f.dtype == out_e.dtype == torch.bfloat16
    torch.testing.assert_close(out_f, out_e, atol=3e-2, rtol=3e-2)


def test_module_keeps_a_quarter_of_the_eager_activations():
    # Eager keeps gate(x), silu(gate(x)), up(x) and the product; the fused GEMM keeps only the product.
    eager, fused = _eager_and_fused(d_model=32, d_ff=80)
    x = torch.randn(4, 32, requires_grad=True)
    assert saved_activation_bytes(eager, x) == 4 * 4 * 80 * 4  # four [tokens, d_ff] fp32 tensors
    assert saved_activation_bytes(fused, x) == 1 * 4 * 80 * 4


def test_module_rejects_an_unknown_fusion():
    from lightning_scaling.kernels.modules import FusedSwiGLU

    with pytest.raises(ValueError, match="fusion must be one of"):
        FusedSwiGLU(32, 64, fusion="fast")


@needs_interpreter
def test_float64_takes_the_exact_path_even_where_the_triton_kernels_would_run():
    # The GEMM kernel accumulates in fp32: float64 goes to the PyTorch path instead of losing precision.
    tensors, grad_out = make_inputs(6, 8, 12, torch.float64)
    with triton_on_cpu():
        ours = run_with_grads(swiglu_gate_up, tensors, grad_out)
    for mine, ref in zip(ours, run_with_grads(eager_gate_up, tensors, grad_out), strict=True):
        assert mine.dtype == torch.float64
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)


def test_the_op_takes_2d_x_only():
    (x, w_gate, w_up), _ = make_inputs(6, 8, 12, torch.float32)
    with pytest.raises(ValueError, match="x must be 2-D"):
        torch.ops.lightning_scaling.swiglu_gate_up_forward(x.view(2, 3, 8), w_gate, w_up)
