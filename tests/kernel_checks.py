"""What the kernel tests share: run a function forward and backward, and hold its error against a float64
reference to at most twice the error of plain PyTorch in the same precision, plus a small floor (the tolerance
rule of FlashAttention's tests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def run_with_grads(fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor],
                   grad_out: torch.Tensor) -> list[torch.Tensor]:
    """[output, gradient of each input] of ``fn(*tensors)`` for the output gradient ``grad_out``."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in tensors]


def assert_within_twice_torch_error(fn: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor],
                                    tensors: Sequence[torch.Tensor], grad_out: torch.Tensor, floor: float) -> None:
    """``fn``'s output and input gradients against ``reference`` run in float64: finite, in the inputs' dtype,
    and off by at most twice what ``reference`` run in the inputs' own dtype is off, plus ``floor``."""
    dtype = tensors[0].dtype
    exact = run_with_grads(reference, [t.double() for t in tensors], grad_out)
    same_precision = run_with_grads(reference, tensors, grad_out)
    ours = run_with_grads(fn, tensors, grad_out)
    for i, (mine, ref, theirs) in enumerate(zip(ours, exact, same_precision)):
        name = "output" if i == 0 else f"gradient of input {i - 1}"
        assert mine.dtype == dtype and mine.shape == ref.shape, f"{name}: {mine.dtype} {tuple(mine.shape)}"
        assert torch.isfinite(mine).all(), f"{name} has non-finite values"
        err_mine = (mine.double() - ref).abs().max().item()
        err_torch = (theirs.double() - ref).abs().max().item()
        assert err_mine <= 2 * err_torch + floor, f"{name}: error {err_mine:.2e} vs PyTorch {dtype} {err_torch:.2e}"
