"""What our callbacks share: counting tokens and samples in a batch, warning once on rank zero,
and never letting our own bookkeeping crash a user's training run."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

TokensFn = Callable[[Any], "int | torch.Tensor"]

_TOKEN_KEYS = ("input_ids", "tokens", "input", "inputs", "x")


def first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in _TOKEN_KEYS:
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
        for value in batch.values():
            found = first_tensor(value)
            if found is not None:
                return found
        return None
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        for value in batch:
            found = first_tensor(value)
            if found is not None:
                return found
    return None


IGNORE_INDEX = -100  # the label PyTorch's cross_entropy, Hugging Face and litgpt ignore

# The token rules, in the words the pre-flight summary and the report use.
RULE_TOKENS_FN = "tokens_fn(batch)"
RULE_ATTENTION_MASK = "non-padding tokens of attention_mask"
RULE_LABELS = "input tokens up to each row's last label that is not -100 (right padding marked in labels)"
RULE_ALL = "every element of the integer token tensor (no padding marked)"


def token_rule(batch: Any, tokens_fn: TokensFn | None = None) -> str | None:
    """Which rule :func:`count_tokens` applies to this batch, in words (None: it cannot count it)."""
    if tokens_fn is not None:
        return getattr(tokens_fn, "rule", RULE_TOKENS_FN)
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return RULE_ATTENTION_MASK
    tensor = first_tensor(batch)
    if tensor is None or tensor.is_floating_point() or tensor.is_complex():
        return None
    return RULE_LABELS if _padding_labels(batch, tensor) is not None else RULE_ALL


def count_tokens(batch: Any, tokens_fn: TokensFn | None = None, *, lazy: bool = False) -> int | torch.Tensor | None:
    """Training tokens in one batch (this rank, one micro-batch), or None when we cannot tell.

    A training token is a non-padding input token: what the model processes, the count that FLOPs and the
    ~20 tokens-per-parameter rule use. In order:

    1. ``tokens_fn(batch)`` when given (see :func:`non_padding_tokens` for a pad id);
    2. the non-padding tokens of ``attention_mask`` when the batch is a mapping that carries one;
    3. without a mask, right padding marked in ``labels`` (same shape as the token tensor): each row counts up
       to its last label that is not -100; a prompt masked with -100 at the start is not padding. A row with no
       label at all counts whole (nothing marks where it ends);
    4. else every element of the token tensor (``input_ids`` or the first tensor of a tuple/list/dict) when it
       holds integer ids. A float tensor is not tokens: None.

    A count summed from a tensor is read back to the host, which waits for the device. With ``lazy=True`` it
    stays a 0-dim tensor on the batch's device instead, for the step ledger that reads every count once per
    optimizer step.
    """
    if tokens_fn is not None:
        value = tokens_fn(batch)
        if isinstance(value, torch.Tensor):
            return value.detach().sum() if lazy else int(value.sum().item())
        return int(value)
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        mask_sum = batch["attention_mask"].detach().sum()
        return mask_sum if lazy else int(mask_sum.item())
    tensor = first_tensor(batch)
    if tensor is None or tensor.is_floating_point() or tensor.is_complex():
        return None
    labels = _padding_labels(batch, tensor)
    if labels is not None:
        count = _tokens_before_trailing_ignore(labels)
        return count if lazy else int(count.item())
    return int(tensor.numel())


def count_supervised_tokens(batch: Any) -> torch.Tensor | None:
    """Tokens that carry a loss: labels that are not -100 (a 0-dim tensor on the batch's device), or None when
    the batch has no ``labels`` tensor."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
        return None
    return (labels.detach() != IGNORE_INDEX).sum()


def non_padding_tokens(pad_token_id: int) -> TokensFn:
    """A ``tokens_fn`` that counts the token ids that are not ``pad_token_id`` (for batches that mark padding
    with a pad id and carry neither an attention mask nor -100 labels)::

        ScalingMonitor(tokens_fn=non_padding_tokens(tokenizer.pad_token_id))
    """
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise ValueError(f"pad_token_id must be a whole number (the tokenizer's pad id), got {pad_token_id!r}")

    def count(batch: Any) -> torch.Tensor:
        tensor = first_tensor(batch)
        if tensor is None or tensor.is_floating_point():
            raise ValueError("the batch has no integer token tensor to count")
        return (tensor.detach() != pad_token_id).sum()

    count.rule = f"token ids other than the pad id {pad_token_id}"  # type: ignore[attr-defined]
    return count


def _padding_labels(batch: Any, tensor: torch.Tensor) -> torch.Tensor | None:
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels is tensor or labels.shape != tensor.shape or tensor.dim() != 2:
        return None
    if labels.is_floating_point():
        return None
    return labels.detach()


def _tokens_before_trailing_ignore(labels: torch.Tensor) -> torch.Tensor:
    """Per row: the position after the last label that is not -100 (the whole row if there is none), summed."""
    seq = labels.shape[1]
    valid = labels != IGNORE_INDEX
    positions = torch.arange(1, seq + 1, device=labels.device)
    ends = (valid * positions).amax(dim=1)  # 0 for a row with no label
    return torch.where(ends > 0, ends, torch.full_like(ends, seq)).sum()


def count_samples(batch: Any) -> int | None:
    """Samples (sequences) in one batch: the leading dimension of its token tensor, or None."""
    tensor = first_tensor(batch)
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


# Where our warnings say they come from: the package, not a file of ours (the message is what matters).
WARNING_LOCATION = "lightning_scaling"


def scaling_warn(message: str) -> None:
    """Warn with ``message`` as a :class:`lightning_scaling.ScalingWarning` on this rank, located at
    ``lightning_scaling:0`` instead of the line of ours that raised it (``warnings.warn`` would print our source
    path, which tells the user nothing). Filters match it by category or by ``module="lightning_scaling"``."""
    from lightning_scaling import ScalingWarning

    warnings.warn_explicit(message, ScalingWarning, filename=WARNING_LOCATION, lineno=0, module=WARNING_LOCATION)


@rank_zero_only
def _scaling_warn_rank_zero(message: str) -> None:
    scaling_warn(message)


class WarnOnce:
    """Warn (or inform) once per key, on rank zero only, each message prefixed with ``prefix`` (the class the
    user configured)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.seen: set[str] = set()

    def warn(self, key: str, message: str) -> bool:
        """A :class:`~lightning_scaling.ScalingWarning` once per ``key``; False when it was given already."""
        if key in self.seen:
            return False
        self.seen.add(key)
        _scaling_warn_rank_zero(f"{self.prefix}: {message}")
        return True

    def info(self, key: str, message: str) -> bool:
        if key in self.seen:
            return False
        self.seen.add(key)
        rank_zero_info(f"{self.prefix}: {message}")
        return True


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


@contextlib.contextmanager
def untouched_random_state() -> Iterator[None]:
    """Restore torch's (CPU), Python's and numpy's random state on exit: reading a dataset item for our own
    estimate must not draw from the user's generators (a random crop in ``__getitem__`` would)."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
