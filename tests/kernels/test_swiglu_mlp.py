"""The whole SwiGLU MLP as one op (``FusedSwiGLU(fusion="elementwise")``): its Triton gate kernels (in Triton's
CPU interpreter here), the CPU reference path, fake tensors, what it saves for backward and its FLOP formula,
against float64 PyTorch references. Module-level checks for both fusions are in tests/kernels/test_swiglu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_equal_in_float64, assert_within_twice_torch_error, needs_interpreter, run_with_grads

from lightning_scaling.kernels import triton_on_cpu
from lightning_scaling.kernels.ops.swiglu_mlp import swiglu_mlp

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3}


def eager_mlp(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()


def make_inputs(tokens, d_model, d_ff, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_model, generator=gen)
    w_gate, w_up = (torch.randn(d_ff, d_model, generator=gen) / d_model**0.5 for _ in range(2))
    w_down = torch.randn(d_model, d_ff, generator=gen) / d_ff**0.5
    grad_out = torch.randn(tokens, d_model, generator=gen)
    return [t.to(dtype) for t in (x, w_gate, w_up, w_down)], grad_out


def check_against_references(tokens, d_model, d_ff, dtype) -> None:
    tensors, grad_out = make_inputs(tokens, d_model, d_ff, dtype)
    assert_within_twice_torch_error(swiglu_mlp, eager_mlp, tensors, grad_out, FLOOR[dtype])


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_gate_kernels_match_float64_reference(dtype):
    with triton_on_cpu():
        check_against_references(37, 24, 40, dtype)


@needs_interpreter
def test_backward_kernel_writes_the_product_again():
    from lightning_scaling.kernels.ops import swiglu as gate_kernels

    gen = torch.Generator().manual_seed(3)
    g, u, dh = (torch.randn(7, 301, generator=gen) for _ in range(3))  # a tail that does not fill a block
    with triton_on_cpu():
        d_gate, d_up, product = gate_kernels._triton_backward(dh, g, u, with_product=True)
        only_grads = gate_kernels._triton_backward(dh, g, u)
    torch.testing.assert_close(product, F.silu(g) * u)
    assert len(only_grads) == 2
    torch.testing.assert_close(only_grads[0], d_gate)
    torch.testing.assert_close(only_grads[1], d_up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cpu_path_matches_float64_reference(dtype):
    check_against_references(9, 24, 40, dtype)


def test_cpu_path_in_float64_is_the_formula_and_passes_gradcheck():
    # gradcheck alone compares the op's PyTorch backward with its own forward; the formula written here checks both
    tensors, grad_out = make_inputs(4, 5, 6, torch.float64)
    assert_equal_in_float64(swiglu_mlp, eager_mlp, tensors, grad_out)
    assert torch.autograd.gradcheck(swiglu_mlp, [t.requires_grad_() for t in tensors])


def test_saves_the_gate_and_up_projections_not_the_product():
    tensors, _ = make_inputs(8, 16, 24, torch.float32)
    x, w_gate, w_up, w_down = (t.requires_grad_() for t in tensors)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu_mlp(x, w_gate, w_up, w_down)
    inputs = {t.untyped_storage().data_ptr() for t in (x, w_gate, w_up, w_down)}
    activations = [t for t in saved if t.untyped_storage().data_ptr() not in inputs]
    assert sorted(tuple(t.shape) for t in activations) == [(8, 24), (8, 24)]  # g and u
    torch.testing.assert_close(activations[0], x.detach() @ w_gate.detach().t())


def test_fake_tensors_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4096, 1024, dtype=torch.bfloat16)
        w, w_down = torch.empty(2816, 1024, dtype=torch.bfloat16), torch.empty(1024, 2816, dtype=torch.bfloat16)
        y, g, u = torch.ops.lightning_scaling.swiglu_mlp_forward(x, w, w, w_down)
        grads = torch.ops.lightning_scaling.swiglu_mlp_backward(y, x, w, w, w_down, g, u)
    assert y.shape == (4096, 1024) and g.shape == u.shape == (4096, 2816)
    assert [tuple(t.shape) for t in grads] == [(4096, 1024), (2816, 1024), (2816, 1024), (1024, 2816)]


def test_opcheck_on_the_cpu_path():
    tensors, grad_out = make_inputs(5, 12, 20, torch.float32)
    ops = torch.ops.lightning_scaling
    torch.library.opcheck(ops.swiglu_mlp_forward, [t.clone().requires_grad_() for t in tensors])
    _, g, u = ops.swiglu_mlp_forward(*tensors)
    torch.library.opcheck(ops.swiglu_mlp_backward, (grad_out, *tensors, g, u))


def test_flop_formula_counts_the_three_gemms():
    from torch.utils.flop_counter import FlopCounterMode

    tensors, _ = make_inputs(6, 32, 80, torch.float32)
    x, *weights = (t.requires_grad_() for t in tensors)
    with FlopCounterMode(display=False) as counter:
        swiglu_mlp(x, *weights).sum().backward()
    assert counter.get_total_flops() == 3 * (3 * 2 * 6 * 32 * 80)  # training = 3 x forward of 3 GEMMs


def test_bad_down_weight_raises_value_error_naming_it():
    tensors, _ = make_inputs(3, 4, 6, torch.float32)
    x, w_gate, w_up, _ = tensors
    with pytest.raises(ValueError, match=r"w_down must be \[d_model=4, d_ff=6\]"):
        swiglu_mlp(x, w_gate, w_up, torch.randn(6, 4))
    with pytest.raises(ValueError, match="w_down must have the dtype of x"):
        swiglu_mlp(x, w_gate, w_up, torch.randn(4, 6).double())


def test_backward_makes_no_zero_gradients_for_the_saved_projections():
    # g and u are outputs without gradients: autograd must not fill [tokens, d_ff] zeros for them.
    from torch.utils._python_dispatch import TorchDispatchMode

    class ZerosLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes: list[tuple] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "zero" in func.overloadpacket.__name__ and isinstance(out, torch.Tensor):
                self.shapes.append(tuple(out.shape))
            return out

    tensors, grad_out = make_inputs(16, 8, 24, torch.float32)
    x, *weights = (t.requires_grad_() for t in tensors)
    y = swiglu_mlp(x, *weights)
    with ZerosLog() as log:
        y.backward(grad_out)
    assert (16, 24) not in log.shapes
    assert x.grad is not None and all(w.grad is not None for w in weights)


@needs_interpreter
def test_float64_takes_the_exact_path_even_where_the_triton_kernels_would_run():
    tensors, grad_out = make_inputs(6, 8, 12, torch.float64)
    with triton_on_cpu():
        ours = run_with_grads(swiglu_mlp, tensors, grad_out)
    exact = run_with_grads(eager_mlp, tensors, grad_out)
    for mine, ref in zip(ours, exact, strict=True):
        assert mine.dtype == torch.float64
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)


def test_the_op_takes_2d_x_only():
    tensors, _ = make_inputs(6, 8, 12, torch.float32)
    x, *weights = tensors
    with pytest.raises(ValueError, match="x must be 2-D"):
        torch.ops.lightning_scaling.swiglu_mlp_forward(x.view(2, 3, 8), *weights)
    assert swiglu_mlp(x.view(2, 3, 8), *weights).shape == (2, 3, 8)  # the wrapper flattens


def test_autocast_leaves_float64_alone_as_linear_does():
    tensors, _ = make_inputs(6, 8, 12, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert swiglu_mlp(*tensors).dtype == torch.float64
