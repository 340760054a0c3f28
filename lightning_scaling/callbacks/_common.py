"""What our callbacks share: counting tokens and samples in a batch, warning once on rank zero,
and never letting our own bookkeeping crash a user's training run."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Callable, TypeVar

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

TokensFn = Callable[[Any], "int | torch.Tensor"]
_F = TypeVar("_F", bound=Callable[..., Any])

_TOKEN_KEYS = ("input_ids", "tokens", "input", "inputs", "x")


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in _TOKEN_KEYS:
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
        for value in batch.values():
            found = _first_tensor(value)
            if found is not None:
                return found
        return None
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        for value in batch:
            found = _first_tensor(value)
            if found is not None:
                return found
    return None


def count_tokens(batch: Any, tokens_fn: TokensFn | None = None, *,
                 lazy: bool = False) -> int | torch.Tensor | None:
    """Training tokens in one batch (this rank, one micro-batch), or None when we cannot tell.

    ``tokens_fn(batch)`` wins when given. Otherwise: the non-padding tokens of ``attention_mask`` when the
    batch is a mapping that carries one; else the element count of the token tensor (``input_ids`` or the
    first tensor of a tuple/list/dict) when it holds integer ids. A float tensor is not tokens: None.

    A count summed from a tensor (a mask, or a tensor from ``tokens_fn``) is read back to the host, which waits
    for the device. With ``lazy=True`` it stays a 0-dim tensor on the batch's device instead, for a caller that
    adds counts up and reads them once per optimizer step (``global_sum`` takes such tensors).
    """
    if tokens_fn is not None:
        value = tokens_fn(batch)
        if isinstance(value, torch.Tensor):
            return value.detach().sum() if lazy else int(value.sum().item())
        return int(value)
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        mask_sum = batch["attention_mask"].detach().sum()
        return mask_sum if lazy else int(mask_sum.item())
    tensor = _first_tensor(batch)
    if tensor is None or tensor.is_floating_point() or tensor.is_complex():
        return None
    return int(tensor.numel())


def count_samples(batch: Any) -> int | None:
    """Samples (sequences) in one batch: the leading dimension of its token tensor, or None."""
    tensor = _first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        return None
    return int(tensor.shape[0])


def shape_signature(batch: Any) -> tuple:
    """Hashable signature of a batch's tensor shapes and dtypes (the key of the FLOP cache)."""
    if isinstance(batch, torch.Tensor):
        return (tuple(batch.shape), str(batch.dtype))
    if isinstance(batch, Mapping):
        return tuple((str(k), shape_signature(v)) for k, v in sorted(batch.items(), key=lambda kv: str(kv[0])))
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return tuple(shape_signature(v) for v in batch)
    return (type(batch).__name__,)


class WarnOnce:
    """Warn (or inform) once per key, on rank zero only."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.seen: set[str] = set()

    def warn(self, key: str, message: str) -> bool:
        if key in self.seen:
            return False
        self.seen.add(key)
        rank_zero_warn(f"{self.prefix}: {message}")
        return True

    def info(self, key: str, message: str) -> bool:
        if key in self.seen:
            return False
        self.seen.add(key)
        rank_zero_info(f"{self.prefix}: {message}")
        return True


def guarded(hook: _F) -> _F:
    """Wrap a hook of a :class:`lightning_scaling.callbacks._base.LedgerCallback` so that an error in our
    bookkeeping warns once and switches that callback off, never the user's run (see ``LedgerCallback.fail``)."""

    @functools.wraps(hook)
    def wrapper(self: Any, trainer: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return None
        try:
            return hook(self, trainer, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - never crash the user's run over our bookkeeping
            self.fail(trainer, f"error in {hook.__name__}: {type(err).__name__}: {err}")
            return None

    return wrapper  # type: ignore[return-value]


def unwrap_loss(output: Any) -> torch.Tensor | None:
    """The loss tensor of a ``training_step`` output (a tensor or a dict with ``loss``), or None."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    return None


def planned_optimizer_steps(trainer: Any) -> int | None:
    """Optimizer steps the whole run will take (``estimated_stepping_batches``), or None when unbounded."""
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - no dataloader length, no max_steps: no projection
        return None
    if steps is None or steps == float("inf") or steps <= 0:
        return None
    return int(steps)


def remaining_micro_batches(trainer: Any, batches_done_in_epoch: int) -> float | None:
    """Micro-batches the run will still train on after the current optimizer step, or None when unbounded.

    Exact under gradient accumulation when epochs end mid-accumulation: an epoch of ``M`` micro-batches takes
    ``ceil(M / k)`` optimizer steps, the last one over ``M mod k`` micro-batches only. ``batches_done_in_epoch``
    is the number of micro-batches of the current epoch trained so far (``batch_idx + 1`` at a step's end).
    """
    planned = planned_optimizer_steps(trainer)
    if planned is None:
        return None
    k = max(int(trainer.accumulate_grad_batches), 1)
    steps_left = max(planned - int(trainer.global_step), 0)
    per_epoch = getattr(trainer, "num_training_batches", float("inf"))
    if not isinstance(per_epoch, int) or per_epoch <= 0 or per_epoch % k == 0:
        return float(steps_left * k)
    steps_per_epoch = -(-per_epoch // k)
    short = k - per_epoch % k  # micro-batches the last step of each epoch lacks
    left_in_epoch = steps_per_epoch - min(-(-batches_done_in_epoch // k), steps_per_epoch)
    if left_in_epoch == 0:
        left_in_epoch = steps_per_epoch  # at an epoch's end: the next epoch starts afresh
    ends = 0 if steps_left < left_in_epoch else 1 + (steps_left - left_in_epoch) // steps_per_epoch
    return float(steps_left * k - ends * short)
