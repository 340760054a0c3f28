"""Fused SwiGLU gate: the Triton kernels (in Triton's CPU interpreter here), the op's CPU reference path, fake
tensors, what it saves for backward, FLOP counting and the module, against float64 PyTorch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import (
    assert_equal_in_float64,
    assert_within_twice_torch_error,
    eager_and_fused_swiglu,
    needs_interpreter,
    saved_activation_bytes,
)
from torch.utils.flop_counter import FlopCounterMode

from lightning_scaling.kernels import triton_on_cpu
from lightning_scaling.kernels.ops.swiglu import swiglu

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4}


def eager_swiglu(gate, up):
    return F.silu(gate) * up


def make_inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate, up, grad_out = (4 * torch.randn(shape, generator=gen) for _ in range(3))
    return gate.to(dtype), up.to(dtype), grad_out


def check_against_references(fn, shape, dtype) -> None:
    gate, up, grad_out = make_inputs(shape, dtype)
    assert_within_twice_torch_error(fn, eager_swiglu, [gate, up], grad_out, FLOOR[dtype])


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1,), (3, 7, 37), (2, 300)])  # tails that do not fill a block
def test_triton_kernels_match_float64_reference(shape, dtype):
    with triton_on_cpu():
        check_against_references(swiglu, shape, dtype)


@needs_interpreter
def test_triton_kernels_take_non_contiguous_inputs():
    gate, up, _ = make_inputs((40, 24), torch.float32)
    with triton_on_cpu():
        out = swiglu(gate.t(), up.t())
    torch.testing.assert_close(out, eager_swiglu(gate.t(), up.t()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cpu_path_matches_float64_reference(dtype):
    check_against_references(swiglu, (5, 33), dtype)


def test_cpu_path_in_float64_is_the_formula_and_passes_gradcheck():
    # gradcheck alone compares the op's PyTorch backward with its own forward; the formula written here checks both
    gate, up, grad_out = make_inputs((4, 6), torch.float64)
    assert_equal_in_float64(swiglu, eager_swiglu, [gate, up], grad_out)
    assert torch.autograd.gradcheck(swiglu, (gate.requires_grad_(), up.requires_grad_()))


def test_saves_only_its_inputs_for_backward():
    # Recomputation: the graph keeps gate and up, not silu(gate) or the product.
    gate, up, _ = make_inputs((8, 16), torch.float32)
    gate.requires_grad_(), up.requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu(gate, up)
    assert len(saved) == 2
    assert {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}


def test_fake_tensors_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        gate = torch.empty(4, 128, 1024, dtype=torch.bfloat16)
        out = torch.ops.lightning_scaling.swiglu_forward(gate, gate)
        d_gate, d_up = torch.ops.lightning_scaling.swiglu_backward(out, gate, gate)
    assert out.shape == gate.shape and out.dtype == torch.bfloat16
    assert d_gate.shape == d_up.shape == gate.shape


@pytest.mark.parametrize(
    "gate,up,match",
    [
        (torch.randn(3, 4), torch.randn(3, 5), "up must have the shape of gate"),
        (torch.randn(3, 4), torch.randn(3, 4).double(), "up must have the dtype of gate"),
        (torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), "gate must be a floating-point"),
        ([1.0], torch.randn(1), "gate must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(gate, up, match):
    with pytest.raises(ValueError, match=match):
        swiglu(gate, up)


@pytest.mark.parametrize("fusion", ["elementwise", "gemm"])
def test_module_matches_example_gpt_swiglu_with_the_same_weights(fusion):
    eager, fused = eager_and_fused_swiglu(fusion=fusion)
    x = torch.randn(2, 9, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out_f, out_e = fused(x), eager(x2)
    torch.testing.assert_close(out_f, out_e)
    out_f.square().sum().backward()
    out_e.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for (name, p_f), p_e in zip(fused.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p_f.grad, p_e.grad, msg=name)


@needs_interpreter
@pytest.mark.parametrize("fusion", ["elementwise", "gemm"])
def test_module_on_triton_kernels_matches_example_gpt_swiglu(fusion):
    eager, fused = eager_and_fused_swiglu(fusion=fusion)
    x = torch.randn(3, 5, 32)
    with triton_on_cpu():
        out = fused(x)
    torch.testing.assert_close(out, eager(x))


@pytest.mark.parametrize("fusion", ["elementwise", "gemm"])
def test_flop_count_is_the_three_linear_layers(fusion):
    # Model FLOPs, as for eager. "elementwise": the op has no matmul, the counters see the gate, up and down
    # GEMMs. "gemm": the fused op's formula counts the gate and up GEMMs it replaces (a counter that missed it
    # would see only down's third); its backward's recomputation is not model FLOPs.
    from lightning_scaling.flops.counter import training_flop_counter

    eager, fused = eager_and_fused_swiglu(d_model=32, d_ff=80, fusion=fusion)
    x = torch.randn(2, 9, 32, requires_grad=True)  # so every backward GEMM (input and weight grads) runs
    tokens = 2 * 9
    expected = 3 * (3 * 2 * tokens * 32 * 80)  # 3 GEMMs of 2·M·d·f; training = 3 × forward
    for counter in (training_flop_counter(), FlopCounterMode(display=False)):
        for module in (fused, eager):
            with counter:
                module(x).sum().backward()
            assert counter.get_total_flops() == expected, type(module).__name__


def test_module_rejects_bad_shapes():
    from lightning_scaling.kernels.modules import FusedSwiGLU

    with pytest.raises(ValueError, match="d_ff"):
        FusedSwiGLU(32, 0)
    with pytest.raises(ValueError, match="x must end in d_model"):
        FusedSwiGLU(32, 64)(torch.randn(2, 16))


def test_opcheck_on_the_cpu_path():
    gate, up, _ = make_inputs((5, 12), torch.float32)
    ops = torch.ops.lightning_scaling
    torch.library.opcheck(ops.swiglu_forward, (gate.requires_grad_(), up.requires_grad_()))
    torch.library.opcheck(ops.swiglu_backward, (torch.randn(5, 12), gate.detach(), up.detach()))


def test_module_keeps_half_of_the_eager_activations():
    # Eager keeps gate(x), silu(gate(x)), up(x) and the product; the elementwise fusion keeps gate(x) and up(x)
    # (its backward writes the product again for down's weight gradient).
    eager, fused = eager_and_fused_swiglu(d_model=32, d_ff=80)
    x = torch.randn(4, 32, requires_grad=True)
    eager_bytes, fused_bytes = saved_activation_bytes(eager, x), saved_activation_bytes(fused, x)
    assert eager_bytes == 4 * 4 * 80 * 4  # four [tokens, d_ff] fp32 tensors
    assert fused_bytes == 2 * 4 * 80 * 4


def test_the_gate_op_between_linear_layers_keeps_three_quarters():
    # The building block alone, as a user would put it between their own nn.Linear layers.
    eager, _ = eager_and_fused_swiglu(d_model=32, d_ff=80)

    class GateOpBetweenLinears(torch.nn.Module):
        def forward(self, x):
            return eager.down(swiglu(eager.gate(x), eager.up(x)))

    x = torch.randn(4, 32, requires_grad=True)
    module = GateOpBetweenLinears()
    module.eager = eager  # so its parameters are skipped like the module's own
    assert saved_activation_bytes(module, x) == 3 * 4 * 80 * 4
