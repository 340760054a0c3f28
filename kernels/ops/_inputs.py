"""Input handling shared by the ops: autocast as ``nn.Linear`` does it, and checks that name the argument."""

from __future__ import annotations

import torch

_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone


def autocast_like_linear(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under ``torch.autocast`` for the first tensor's device, cast the fp32/fp16/bf16 ones to the autocast dtype,
    as ``F.linear`` casts its input and weight; otherwise return them unchanged."""
    first = tensors[0]
    if not (isinstance(first, torch.Tensor) and torch.is_autocast_enabled(first.device.type)):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_CASTS else t for t in tensors)


def check_float_tensor(name: str, t: object, like: torch.Tensor | None = None, same_dtype: bool = True) -> torch.Tensor:
    """Raise ``ValueError`` naming the argument unless ``t`` is a floating-point tensor (on the device of ``like``,
    the tensor called x, and of its dtype when ``same_dtype``); returns ``t``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if like is not None and same_dtype and t.dtype != like.dtype:
        raise ValueError(f"{name} must have the dtype of x ({like.dtype}), got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} must be on the device of x ({like.device}), got {t.device}")
    return t


def check_2d(x: torch.Tensor) -> None:
    """The ops take x as [tokens, d_model]; their public wrappers flatten the leading dimensions."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, d_model] for the op (the wrapper flattens), got {tuple(x.shape)}")


def check_gate_up_inputs(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, extra: dict[str, torch.Tensor] | None = None
) -> None:
    """Raise ``ValueError`` naming the argument unless x [..., d_model] and w_gate, w_up [d_ff, d_model] (and the
    ``extra`` tensors) are floating-point tensors of one dtype and device, with at least one token."""
    for name, t in (("x", x), ("w_gate", w_gate), ("w_up", w_up), *(extra or {}).items()):
        check_float_tensor(name, t, like=x)
    if w_gate.dim() != 2 or x.dim() < 1 or w_gate.shape[1] != x.shape[-1]:
        raise ValueError(
            f"w_gate must be [d_ff, d_model={x.shape[-1] if x.dim() else '?'}], got "
            f"{tuple(w_gate.shape)} for x of shape {tuple(x.shape)}"
        )
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up must have the shape of w_gate {tuple(w_gate.shape)}, got {tuple(w_up.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x must hold at least one token, got shape {tuple(x.shape)}")


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops' PyTorch reference paths compute in: float64 for float64 inputs, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32
