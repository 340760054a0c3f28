"""The step ledger: one set of books per training run, shared by every lightning-scaling callback.

Every part (FlopCounter, TokenBudget, GradientNoiseScale, DataRepetition) needs the same facts about each optimizer
step: the tokens and samples it trained on, whether a micro-batch was skipped, the loss, and the few numbers of
its own (FLOPs, gradient norms). Counting them separately walked each micro-batch several times and cost a
collective and a host read per part per step. The ledger counts each micro-batch once, keeps the counts on the
batch's device, and at each optimizer step sums every part's numbers over the data-parallel ranks with ONE packed
all-reduce and reads them back to the host ONCE. Each part then reads its numbers from the same
:class:`StepRecord`.

The ledger is also the single place that decides "an optimizer step happened": ``trainer.global_step`` advanced
since the micro-batch before (which covers gradient accumulation, epochs that end mid-accumulation, manual
optimization with several optimizers, and a resumed run, whose anchor is taken in ``on_train_start``, after
Lightning restored ``global_step``).

Parts never construct a ledger: :meth:`StepLedger.attach` finds the trainer's ledger or creates it, so a part used
alone and four parts inside ``ScalingMonitor`` share one. Every ledger call is idempotent per micro-batch, so
whichever part reaches a hook first does the work and the others find it done.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_scaling.callbacks._common import (
    TokensFn,
    count_samples,
    count_supervised_tokens,
    count_tokens,
    planned_optimizer_steps,
    token_rule,
    unwrap_loss,
)

# Slots every ledger has, filled by the ledger itself.
SAMPLES = "samples"  # samples (sequences) trained on, all ranks
MICRO_BATCHES = "micro_batches"  # micro-batches that ran a backward pass, all ranks
SKIPPED = "skipped_micro_batches"  # micro-batches whose training_step returned None (no backward)
NO_SAMPLES = "uncountable_samples"  # micro-batches with no tensor to count samples in
LOSS_SUM = "loss_sum"  # sum of the trained micro-batches' losses (not divided by accumulation)
LOSS_COUNT = "loss_count"  # micro-batches whose loss was seen
SUPERVISED = "supervised_tokens"  # labels that are not -100, when batches carry labels
_BUILTIN = (SAMPLES, MICRO_BATCHES, SKIPPED, NO_SAMPLES, LOSS_SUM, LOSS_COUNT, SUPERVISED)

_LEDGERS: weakref.WeakKeyDictionary[Any, StepLedger] = weakref.WeakKeyDictionary()


@dataclass
class StepRecord:
    """What happened in one optimizer step (or, at the end of training, in the micro-batches after the last one).

    ``values`` holds every slot summed over the step's micro-batches and over the data-parallel ranks.
    ``steps`` is how far ``trainer.global_step`` advanced (1 normally, 0 for trailing micro-batches that no
    optimizer step followed). ``global_step`` is the trainer's step after it. ``log_now``: metrics are due to the
    loggers after this step (Lightning's ``log_every_n_steps``, and the run's last step). ``errors`` maps a problem (for
    example a ``tokens_fn`` that raised) to its first message on this rank.
    """

    values: dict[str, float]
    steps: int
    global_step: int
    world_size: int
    errors: dict[str, str] = field(default_factory=dict)
    log_now: bool = False  # the trainer's logging interval is due (or this is the run's last step)

    def __getitem__(self, name: str) -> float:
        return self.values[name]

    def tokens(self, rule: str) -> float:
        """Training tokens under one token rule (see :meth:`StepLedger.token_rule`)."""
        return self.values[rule]

    @property
    def mean_loss(self) -> float:
        """Mean training loss over the step's micro-batches and ranks (NaN when none was seen)."""
        count = self.values[LOSS_COUNT]
        return self.values[LOSS_SUM] / count if count > 0 else math.nan


class StepLedger:
    """Per-run books shared by the lightning-scaling callbacks (see the module docstring).

    Life cycle, driven by the parts' hooks (each call idempotent):
    :meth:`attach` (setup) -> :meth:`declare` / :meth:`token_rule` -> :meth:`anchor` (on_train_start) ->
    for each micro-batch :meth:`begin` -> :meth:`add` / :meth:`backward_done` -> :meth:`end`, which returns the
    :class:`StepRecord` when the micro-batch completed an optimizer step -> :meth:`finish` (on_train_end).
    """

    def __init__(self) -> None:
        self._slots: dict[str, int] = {}
        self._rules: dict[str, TokensFn | None] = {}
        self._step: list[Any] = []  # this rank's sums since the last record, one entry per slot
        self._micro: dict[int, Any] = {}  # the open micro-batch's values, by slot index
        self._micro_batch: Any = None
        self._micro_idx: int | None = None
        self._micro_open = False
        self._micro_backward = False
        self.micro_samples: int | None = None  # samples of the open micro-batch (None: not countable)
        self._last_step: int | None = None
        self._record: StepRecord | None = None
        self._record_key: Any = None
        self.errors: dict[str, str] = {}
        self.planned_steps: int | None = None  # optimizer steps of the whole run, when bounded
        self.rules_applied: dict[str, str] = {}
        self._owners: dict[type, Any] = {}  # token slot -> the rule its first counted batch used, in words
        self._pending_micro = 0  # micro-batches closed since the last record (host count, equal on every rank)
        self._serial = 0  # micro-batches begun: the key of a record is the serial of the micro-batch that built it
        for name in _BUILTIN:
            self.declare(name)

    # ------------------------------------------------------------------------------------------- registry
    @classmethod
    def attach(cls, trainer: Any) -> StepLedger:
        """The trainer's ledger, created on first use."""
        ledger = _LEDGERS.get(trainer)
        if ledger is None:
            ledger = _LEDGERS[trainer] = cls()
        return ledger

    @classmethod
    def detach(cls, trainer: Any) -> None:
        """Forget the trainer's ledger (at teardown), so that a later ``fit`` starts new books."""
        _LEDGERS.pop(trainer, None)

    # -------------------------------------------------------------------------------------- declarations
    def claim(self, part: Any) -> bool:
        """Register ``part`` as the trainer's one instance of its class; False when another instance already is
        (its numbers would be added twice)."""
        owner = self._owners.setdefault(type(part), part)
        return owner is part

    def declare(self, *names: str) -> None:
        """Declare slots (numbers summed per step and over ranks). Every rank declares the same names in the same
        order (the parts do it in ``setup``), so the packed all-reduce lines up; declaring a name twice is a no-op."""
        for name in names:
            if name not in self._slots:
                self._slots[name] = len(self._slots)
                self._step.append(0)

    def token_rule(self, tokens_fn: TokensFn | None) -> str:
        """The slot that counts training tokens with ``tokens_fn`` (None: the default rule of
        :func:`count_tokens`). Parts that share a ``tokens_fn`` share the count; each rule is counted once per
        micro-batch."""
        if tokens_fn is None:
            name = "tokens"
        else:
            name = next((n for n, fn in self._rules.items() if fn is tokens_fn), f"tokens[{len(self._rules)}]")
        if name not in self._rules:
            self._rules[name] = tokens_fn
            self.declare(name, f"{name}/uncountable")
        return name

    # ------------------------------------------------------------------------------------------ the step
    def anchor(self, trainer: Any) -> None:
        """Take ``trainer.global_step`` as the step before the first micro-batch (call in ``on_train_start``,
        after Lightning restored it from a checkpoint)."""
        if self._last_step is None:
            self._last_step = int(trainer.global_step)
            self.planned_steps = planned_optimizer_steps(trainer)

    def begin(self, trainer: Any, batch: Any, batch_idx: int) -> bool:
        """Open a micro-batch and count its samples and tokens (lazily: mask sums stay on the device).
        Returns False when this micro-batch was already opened (by another part)."""
        if self._micro_open and batch is self._micro_batch and batch_idx == self._micro_idx:
            return False
        if self._last_step is None:
            self.anchor(trainer)
        self._micro = {}
        self._serial += 1
        self._micro_batch, self._micro_idx = batch, batch_idx
        self._micro_open, self._micro_backward = True, False
        samples = count_samples(batch)
        self.micro_samples = samples
        if samples is None:
            self.add(NO_SAMPLES, 1)
        else:
            self.add(SAMPLES, samples)
        supervised = count_supervised_tokens(batch)
        if supervised is not None:
            self.add(SUPERVISED, supervised)
        for rule, fn in self._rules.items():
            if rule not in self.rules_applied:
                described = token_rule(batch, fn)
                if described is not None:
                    self.rules_applied[rule] = described
            try:
                tokens = count_tokens(batch, fn, lazy=True)
            except Exception as err:  # noqa: BLE001 - a user's tokens_fn that raises is reported, never re-raised
                self.errors.setdefault(f"{rule}/error", f"tokens_fn raised {type(err).__name__}: {err}")
                tokens = None
            if tokens is None:
                self.add(f"{rule}/uncountable", 1)
                self.errors.setdefault(f"{rule}/uncountable_type", type(batch).__name__)
            else:
                self.add(rule, tokens)
        return True

    def add(self, name: str, value: float | torch.Tensor) -> None:
        """Add ``value`` (a number or a 0-dim tensor on any device: no host read) to the open micro-batch; it
        joins the step when the micro-batch trains, and is dropped when ``training_step`` returned None."""
        index = self._slots[name]
        self._micro[index] = _plus(self._micro.get(index, 0), value)

    def add_to_step(self, name: str, value: float | torch.Tensor) -> None:
        """Add ``value`` to the current optimizer step directly (numbers known only at the step, e.g. in
        ``on_before_optimizer_step``)."""
        index = self._slots[name]
        self._step[index] = _plus(self._step[index], value)

    def backward_done(self) -> None:
        """The open micro-batch ran its backward pass (``on_after_backward``): it trains."""
        self._micro_backward = True

    @property
    def in_micro_batch(self) -> bool:
        return self._micro_open

    def end(self, trainer: Any, pl_module: Any, batch: Any, outputs: Any) -> StepRecord | None:
        """Close the micro-batch; when it completed an optimizer step, sum the step over the ranks (one
        all-reduce, one host read) and return its record. Every part may call this; all get the same record."""
        if self._micro_open and batch is self._micro_batch:
            self._close_micro(trainer, pl_module, outputs)
        key = self._serial
        if self._record_key == key:
            return self._record  # another part built it already
        if self._last_step is None or trainer.global_step == self._last_step:
            return None
        steps = int(trainer.global_step) - self._last_step
        self._last_step = int(trainer.global_step)
        self._record = self._flush(trainer, steps)
        self._record_key = key
        return self._record

    def finish(self, trainer: Any) -> StepRecord | None:
        """At the end of training: a record of the micro-batches that no optimizer step followed
        (``steps == 0``), or None when there are none. Every rank calls this together (``on_train_end``); ranks
        run the same number of micro-batches, so they agree on whether there is a record."""
        self._micro_open, self._micro_batch = False, None
        if self._record_key == "finish":
            return self._record
        self._record_key = "finish"
        self._record = self._flush(trainer, 0) if self._pending_micro else None
        return self._record

    # -------------------------------------------------------------------------------------------- internal
    def _close_micro(self, trainer: Any, pl_module: Any, outputs: Any) -> None:
        self._micro_open = False
        self._micro_batch = None
        self._pending_micro += 1
        manual = not getattr(pl_module, "automatic_optimization", True)
        trained = self._micro_backward or (manual and bool(outputs))
        if not trained:
            self._step[self._slots[SKIPPED]] += 1
            return
        step = self._step
        for index, value in self._micro.items():
            step[index] = _plus(step[index], value)
        self._step[self._slots[MICRO_BATCHES]] += 1
        loss = unwrap_loss(outputs)
        if loss is not None and loss.numel() == 1:  # manual optimization may hand back any tensor
            # Lightning hands back the loss divided by accumulate_grad_batches (automatic optimization)
            scale = 1 if manual else int(trainer.accumulate_grad_batches)
            self._step[self._slots[LOSS_SUM]] = self._step[self._slots[LOSS_SUM]] + loss.detach().float() * scale
            self._step[self._slots[LOSS_COUNT]] += 1

    def _flush(self, trainer: Any, steps: int) -> StepRecord:
        values = self._step
        self._step = [0] * len(values)
        self._pending_micro = 0
        names = list(self._slots)
        world = int(getattr(trainer, "world_size", 1) or 1)
        if world <= 1:
            read = _read_back(values)
        else:
            device = trainer.strategy.root_device
            dtype = torch.float32 if device.type == "mps" else torch.float64
            packed = torch.tensor(
                [0.0 if isinstance(v, torch.Tensor) else float(v) for v in values], dtype=dtype, device=device
            )
            for i, v in enumerate(values):
                if isinstance(v, torch.Tensor):  # stays on the device: the reduce below reads it with the rest
                    packed[i] += v.detach().reshape(()).to(device=device, dtype=dtype)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # not strategy.reduce: Lightning's DDP reduce puts a barrier before the all-reduce (2 collectives)
                torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
            else:
                packed = trainer.strategy.reduce(packed, reduce_op="sum")
            read = packed.tolist()
        return StepRecord(
            values=dict(zip(names, read, strict=True)),
            steps=steps,
            global_step=int(trainer.global_step),
            world_size=world,
            errors=dict(self.errors),
            log_now=steps > 0 and _logging_due(trainer, self.planned_steps),
        )


def _plus(total: Any, value: Any) -> Any:
    """``total + value``, or ``value`` itself while the total is the untouched 0 (adding a tensor to 0 would be one
    more device op per slot and step)."""
    return value if isinstance(total, int) and total == 0 else total + value


def _logging_due(trainer: Any, planned_steps: int | None) -> bool:
    """Whether Lightning writes step metrics to the loggers after this batch (``log_every_n_steps``, or the run
    stopping), or this is the run's last optimizer step."""
    if planned_steps is not None and trainer.global_step >= planned_steps:
        return True
    every = int(getattr(trainer, "log_every_n_steps", 50) or 0)
    if every <= 0:
        return False
    should = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", None)
    if isinstance(should, bool):
        return should
    return trainer.global_step % every == 0


def _read_back(values: list[Any]) -> list[float]:
    """Numbers as floats; 0-dim tensors read back to the host together (one wait for the device)."""
    out = [0.0 if isinstance(v, torch.Tensor) else float(v) for v in values]
    lazy = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    if lazy:
        device = values[lazy[0]].device  # a tokens_fn may count on the CPU while the loss is on the GPU
        dtype = torch.float32 if device.type == "mps" else torch.float64
        scalars = []
        for i in lazy:
            t = values[i].detach()
            if t.dim():
                t = t.reshape(())
            if t.dtype != dtype or t.device != device:  # counts (int64) stay exact in float64
                t = t.to(device=device, dtype=dtype)
            scalars.append(t)
        read = torch.stack(scalars).tolist()
        for i, value in zip(lazy, read, strict=True):
            out[i] = value
    return out
