"""What our callbacks share: counting tokens and samples in a batch, warning once on rank zero,
and never letting our own bookkeeping crash a user's training run."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Mapping, Sequence
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
    """Wrap a callback hook so an error in our bookkeeping warns once and switches the callback off.

    The instance needs ``self.enabled`` (bool) and ``self._warn`` (a ``WarnOnce``). With several processes the
    callback must not switch off on one rank alone: the others would wait for it in our next collective. The
    failing rank then records ``self._local_failure``, warns on its own, and keeps taking part; the next
    :func:`global_sum` carries the failure to every rank and switches the callback off everywhere at once.
    """

    @functools.wraps(hook)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(self, "enabled", True):
            return None
        try:
            return hook(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - never crash the user's run over our bookkeeping
            message = f"error in {hook.__name__}: {type(err).__name__}: {err}. Training continues; please report this."
            trainer = args[0] if args else None
            if getattr(trainer, "world_size", 1) > 1:
                if getattr(self, "_local_failure", None) is None:
                    self._local_failure = message
                    warnings.warn(f"{self._warn.prefix} (rank {trainer.global_rank}): {message}", stacklevel=2)
                return None
            self.enabled = False
            self._warn.warn("internal-error", f"switched off after an {message}")
            return None

    return wrapper  # type: ignore[return-value]


def unwrap_loss(output: Any) -> torch.Tensor | None:
    """The loss tensor of a ``training_step`` output (a tensor or a dict with ``loss``), or None."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    return None


def global_sum(trainer: Any, values: Sequence[int | torch.Tensor], owner: Any = None) -> list[int]:
    """Sum integer counters over data-parallel ranks with one all-reduce (SUM; gloo has no AVG).

    Every rank must call this at the same point (for example once per optimizer step). ``values`` may hold
    0-dim tensors (lazy counts, see :func:`count_tokens`): they are read back together, in one wait for the
    device. With one process nothing else happens. With ``owner`` (a guarded callback), a failure recorded on
    any rank rides along, and the callback is switched off on every rank together.
    """
    lazy = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    if getattr(trainer, "world_size", 1) <= 1:
        counts = [0 if i in lazy else int(v) for i, v in enumerate(values)]
        if lazy:
            read = torch.stack([values[i].detach().to(torch.int64) for i in lazy]).tolist()
            for i, value in zip(lazy, read):
                counts[i] = int(value)
        return counts
    failed = int(getattr(owner, "_local_failure", None) is not None)
    device = trainer.strategy.root_device
    host = [0 if i in lazy else int(v) for i, v in enumerate(values)]
    tensor = torch.tensor([*host, failed], dtype=torch.int64, device=device)
    for i in lazy:  # on the device: no wait here; the reduce below reads everything back at once
        tensor[i] += values[i].detach().to(device=device, dtype=torch.int64)
    reduced = [int(v) for v in trainer.strategy.reduce(tensor, reduce_op="sum").tolist()]
    if owner is not None and reduced[-1] > 0:
        owner.enabled = False
        owner._warn.warn(
            "internal-error",
            f"switched off on every rank after an error on {reduced[-1]} rank(s); training continues.",
        )
    return reduced[:-1]


class OptimizerSteps:
    """Tells at ``on_train_batch_end`` whether the micro-batch just finished completed an optimizer step.

    Anchor it in ``on_train_start``, not ``on_fit_start``: Lightning restores ``global_step`` from a checkpoint
    between the two, and an anchor taken before would count the first resumed micro-batch as a step.
    """

    def __init__(self) -> None:
        self.last: int | None = None  # trainer.global_step at the last completed step (or the anchor)

    def anchor(self, trainer: Any) -> None:
        self.last = trainer.global_step

    def completed(self, trainer: Any) -> int | None:
        """Optimizer steps completed since the last call, or None while still accumulating."""
        if trainer.global_step == self.last:
            return None
        advanced = trainer.global_step - (self.last or 0)
        self.last = trainer.global_step
        return advanced


def planned_optimizer_steps(trainer: Any) -> int | None:
    """Optimizer steps the whole run will take (``estimated_stepping_batches``), or None when unbounded."""
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - no dataloader length, no max_steps: no projection
        return None
    if steps is None or steps == float("inf") or steps <= 0:
        return None
    return int(steps)


_REPLAYING = False


def replaying_training_step() -> bool:
    """True while one of our callbacks re-runs ``training_step`` for its own measurement (see below)."""
    return _REPLAYING


@contextlib.contextmanager
def training_step_replay(pl_module: Any) -> Iterator[None]:
    """Mark a re-run of ``training_step`` made for our own measurements (the FLOP counting pass, the noise
    scale's half batch): ``self.log``/``self.log_dict`` become no-ops (the real step already logged), and other
    callbacks' gradient hooks can tell these gradients from the real step's (``replaying_training_step()``)."""
    global _REPLAYING

    def noop(*args: Any, **kwargs: Any) -> None:
        return None

    previous, _REPLAYING = _REPLAYING, True
    pl_module.log, pl_module.log_dict = noop, noop
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict
        _REPLAYING = previous
