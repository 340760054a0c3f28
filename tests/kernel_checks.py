"""What the kernel tests share: run a function forward and backward, and hold its error against a float64
reference to at most twice the error of plain PyTorch in the same precision, plus a small floor (the tolerance
rule of FlashAttention's tests); the mark for tests that run the Triton kernels in Triton's CPU interpreter; the
bytes autograd keeps for backward; the example GPT's SwiGLU beside the fused module with the same weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from lightning_scaling.kernels import interpreter_enabled

needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not interpreter_enabled(),
    reason="runs the kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, no CUDA GPU); on a GPU, "
    "tests/kernels/test_gpu.py runs the compiled kernels",
)


def run_with_grads(
    fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor], grad_out: torch.Tensor
) -> list[torch.Tensor]:
    """[output, gradient of each input] of ``fn(*tensors)`` for the output gradient ``grad_out``."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in tensors]


def assert_within_twice_torch_error(
    fn: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    tensors: Sequence[torch.Tensor],
    grad_out: torch.Tensor,
    floor: float,
) -> None:
    """``fn``'s output and input gradients against ``reference`` run in float64: finite, in the inputs' dtype,
    and off by at most twice what ``reference`` run in the inputs' own dtype is off, plus ``floor``."""
    dtype = tensors[0].dtype
    exact = run_with_grads(reference, [t.double() for t in tensors], grad_out)
    same_precision = run_with_grads(reference, tensors, grad_out)
    ours = run_with_grads(fn, tensors, grad_out)
    for i, (mine, ref, theirs) in enumerate(zip(ours, exact, same_precision, strict=True)):
        name = "output" if i == 0 else f"gradient of input {i - 1}"
        assert mine.dtype == dtype and mine.shape == ref.shape, f"{name}: {mine.dtype} {tuple(mine.shape)}"
        assert torch.isfinite(mine).all(), f"{name} has non-finite values"
        err_mine = (mine.double() - ref).abs().max().item()
        err_torch = (theirs.double() - ref).abs().max().item()
        assert err_mine <= 2 * err_torch + floor, f"{name}: error {err_mine:.2e} vs PyTorch {dtype} {err_torch:.2e}"


def assert_equal_in_float64(
    fn: Callable[..., torch.Tensor],
    formula: Callable[..., torch.Tensor],
    tensors: Sequence[torch.Tensor],
    grad_out: torch.Tensor,
    tolerance: float = 1e-10,
) -> None:
    """``fn``'s float64 output and input gradients equal those of ``formula`` (a naive float64 formula written in
    the test, differentiated by autograd) to ``tolerance`` (relative and absolute): the op's own PyTorch path is
    checked against code it does not share."""
    ours = run_with_grads(fn, [t.double() for t in tensors], grad_out.double())
    exact = run_with_grads(formula, [t.double() for t in tensors], grad_out.double())
    for i, (mine, ref) in enumerate(zip(ours, exact, strict=True)):
        name = "output" if i == 0 else f"gradient of input {i - 1}"
        assert mine.dtype == torch.float64, name
        torch.testing.assert_close(mine, ref, rtol=tolerance, atol=tolerance, msg=name)


def saved_activation_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward, other than the parameters and the input."""
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(saved.values())


def eager_and_fused_swiglu(d_model: int = 32, d_ff: int = 80, fusion: str = "elementwise"):
    """The example GPT's eager SwiGLU MLP and ``FusedSwiGLU(fusion=...)`` holding the same weights."""
    from gpt import GPTConfig, SwiGLU

    from lightning_scaling.kernels.modules import FusedSwiGLU

    torch.manual_seed(0)
    eager = SwiGLU(GPTConfig(d_model=d_model, d_ff=d_ff))
    fused = FusedSwiGLU(d_model, d_ff, fusion=fusion)
    fused.load_state_dict(eager.state_dict())  # same parameter names: checkpoints interchange
    return eager, fused
