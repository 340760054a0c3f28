"""LedgerCallback: the base of the four lightning-scaling callbacks.

It drives the shared :class:`~lightning_scaling.callbacks._ledger.StepLedger` from Lightning's hooks, hands each
part the per-step record, logs the part's metrics at the trainer's logging interval in one call, and keeps the
promise that our bookkeeping never stops the user's run: an error in a part warns once and switches that part off
(on every rank together under DDP, so that no rank is left waiting in the ledger's all-reduce).

A part overrides the ``_on_*`` methods below, each guarded; it never calls the ledger's life-cycle methods itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_scaling.callbacks._common import WarnOnce, scaling_warn
from lightning_scaling.callbacks._ledger import StepLedger, StepRecord

_F = TypeVar("_F", bound=Callable[..., Any])


class LedgerCallback(Callback):
    """Base class: the ledger's hooks, guarded part hooks, once-only warnings and interval logging."""

    def __init__(self) -> None:
        self.enabled = True
        self._warn = WarnOnce(type(self).__name__)
        # Set by ScalingMonitor: (its keyword for this part's options, the options it takes directly).
        self._monitor_options: tuple[str, frozenset[str]] | None = None
        self._configured_as = type(self).__name__
        self._local_failure: str | None = None
        self.ledger: StepLedger | None = None
        self._rule: str | None = None  # the ledger slot of this part's token count, when it counts tokens
        # ScalingMonitor sets this to a dict: the part's metrics then go there, for one log call of the monitor's
        self.metrics_sink: dict[str, float] | None = None

    @property
    def configured_as(self) -> str:
        """The class the user configured, which our messages name: this part's class, or ``"ScalingMonitor"``
        when the monitor runs it (its messages then start "ScalingMonitor (tokens): ...", the part named by the
        monitor's keyword for it)."""
        return self._configured_as

    @configured_as.setter
    def configured_as(self, name: str) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"configured_as must be a class name, got {name!r}")
        self._configured_as = name
        key = None if self._monitor_options is None else self._monitor_options[0]
        self._warn.prefix = name if key is None else f"{name} ({key})"

    def configure_through_monitor(self, monitor: str, key: str, direct_options: frozenset[str] | set[str]) -> None:
        """Name ``monitor`` (a class name) and this part's keyword ``key`` in messages ("ScalingMonitor (tokens):
        ..."), and tell users to pass this part's option ``x`` as ``monitor(x=...)`` when ``x`` is in
        ``direct_options``, else as ``monitor(key={"x": ...})``."""
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"key must be the monitor's keyword for this part, got {key!r}")
        self._monitor_options = (key, frozenset(direct_options))
        self.configured_as = monitor

    def option_hint(self, name: str, value: str = "...") -> str:
        """How the user sets this part's option ``name``, as code: ``TokenBudget(tokens_fn=...)``, or through the
        monitor ``ScalingMonitor(tokens_fn=...)`` / ``ScalingMonitor(repetition={"sketch": True})``."""
        if self._monitor_options is None:
            return f"{type(self).__name__}({name}={value})"
        key, direct = self._monitor_options
        if name in direct:
            return f"{self.configured_as}({name}={value})"
        return f'{self.configured_as}({key}={{"{name}": {value}}})'

    @property
    def _failure_slot(self) -> str:
        return f"failed/{type(self).__name__}"

    # ------------------------------------------------------------------------------ Lightning hooks, in order
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.ledger = StepLedger.attach(trainer)
        self.ledger.declare(self._failure_slot)
        if not self.ledger.claim(self):
            # a second FlopCounter (say) beside ScalingMonitor's would add every number twice to the shared books
            self.enabled = False
            self._warn.warn(
                "duplicate",
                f"another {type(self).__name__} is already on this Trainer (ScalingMonitor "
                "includes one of each part); this one is switched off.",
            )
            return
        self._guard(self._on_setup_fit, trainer, pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.ledger is None:
            return
        self.ledger.anchor(trainer)
        self._guard(self._on_train_start, trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.ledger is None:
            return
        self.ledger.begin(trainer, batch, batch_idx)
        self._guard(self._on_micro_batch_start, trainer, pl_module, batch, batch_idx)

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.ledger is None or not self.ledger.in_micro_batch:
            return
        self.ledger.backward_done()
        self._guard(self._on_after_backward, trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.ledger is None:
            return
        self._guard(self._on_before_optimizer_step, trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.ledger is None:
            return
        self._guard(self._on_micro_batch_end, trainer, pl_module, outputs, batch)
        record = self.ledger.end(trainer, pl_module, batch, outputs)
        if record is not None:
            self._take(trainer, pl_module, record)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.ledger is None:
            return
        record = self.ledger.finish(trainer)
        if record is not None:
            self._take(trainer, pl_module, record)
        self._guard(self._on_train_end, trainer, pl_module)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning skips teardown after an exception: forget the books, so that a retried fit starts afresh
        StepLedger.detach(trainer)
        self.ledger = None

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            StepLedger.detach(trainer)
            self.ledger = None

    # -------------------------------------------------------------------------- what the parts override
    def _on_setup_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``setup("fit")``, after the ledger is attached: declare slots and token rules here."""

    def _on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``on_train_start`` (``global_step`` is restored from a checkpoint by now)."""

    def _on_micro_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """A micro-batch begins (the ledger has counted its tokens and samples)."""

    def _on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The micro-batch's backward pass is done."""

    def _on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Gradients are complete (unscaled under AMP, not yet clipped): add step-level numbers here."""

    def _on_micro_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any) -> None:
        """The micro-batch ends, before the ledger builds the step's record (last chance to add to it)."""

    def _on_step(self, trainer: Trainer, pl_module: LightningModule, record: StepRecord) -> dict[str, float] | None:
        """An optimizer step completed (``record.steps >= 1``), or training ended with micro-batches no step
        followed (``record.steps == 0``): update the totals and return the metrics to log (or None)."""
        return None

    def _on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``on_train_end``, after the last record."""

    # -------------------------------------------------------------------------------------------- helpers
    def fail(self, trainer: Any, message: str) -> None:
        """Our bookkeeping failed. One process: warn once and switch this part off. Several: warn on this rank,
        keep taking part in the ledger's all-reduce, and let the next record switch the part off on every rank."""
        if getattr(trainer, "world_size", 1) > 1 and self.ledger is not None:
            if self._local_failure is None:
                self._local_failure = message
                self.ledger.add_to_step(self._failure_slot, 1)
                scaling_warn(f"{self._warn.prefix}, rank {trainer.global_rank}: {message}")  # this rank's own
            return
        self.enabled = False
        self._switched_off()
        self._warn.warn("internal-error", f"switched off after an {message}. Training continues; please report this.")

    def _switched_off(self) -> None:
        """Called once this part has switched itself off after an error (``enabled`` is False): let go of what it
        holds in the user's model (hooks, tensors)."""

    def _guard(self, method: Any, trainer: Any, *args: Any) -> Any:
        if not self.enabled:
            return None
        try:
            return method(trainer, *args)
        except Exception as err:  # noqa: BLE001 - never crash the user's run over our bookkeeping
            name = getattr(method, "__name__", None) or method.func.__name__  # a bound method, or guarded's partial
            self.fail(trainer, f"error in {name.lstrip('_')}: {type(err).__name__}: {err}")
            return None

    def _take(self, trainer: Trainer, pl_module: LightningModule, record: StepRecord) -> None:
        failed = record.values.get(self._failure_slot, 0)
        if failed > 0 and self.enabled:
            self.enabled = False
            self._switched_off()
            self._warn.warn(
                "internal-error",
                f"switched off on every rank after an error on {int(failed)} rank(s); training continues.",
            )
            return
        error = record.errors.get(f"{self._rule}/error") if self._rule else None
        if error:
            self._warn.warn("tokens-fn-failed", f"{error}; the tokens of such batches are not counted.")
        metrics = self._guard(self._on_step, trainer, pl_module, record)
        if metrics and record.steps > 0 and record.log_now:
            self._log(pl_module, metrics)

    def _log(self, pl_module: LightningModule, metrics: dict[str, float]) -> None:
        if self.metrics_sink is not None:
            self.metrics_sink.update(metrics)
            return
        publish_metrics(pl_module.trainer, metrics)


def guarded(hook: _F) -> _F:
    """Run a Lightning hook that a part overrides directly (``on_fit_start``, say) under
    :meth:`LedgerCallback._guard`, like the ``_on_*`` methods: an error warns once and switches the part off."""

    @functools.wraps(hook)
    def wrapper(self: LedgerCallback, trainer: Any, *args: Any) -> Any:
        return self._guard(functools.partial(hook, self), trainer, *args)

    return wrapper  # type: ignore[return-value]


def publish_metrics(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Hand ``metrics`` to every logger of the trainer (at Lightning's step for this batch, as its own step
    metrics are) and to ``trainer.callback_metrics`` (for the progress bar, ``EarlyStopping`` and
    ``ModelCheckpoint``), as Lightning's ``LearningRateMonitor`` does. ``LightningModule.log`` would do the same
    at about 30x the cost per metric (it builds a result entry for each), which on a small model is a
    measurable share of a step."""
    if not metrics:
        return
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = int(getattr(loop, "_batches_that_stepped", trainer.global_step))
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    # The dict behind trainer.callback_metrics: the property itself first converts Lightning's pending logged
    # values (a read from the device), which this update does not need.
    target = getattr(getattr(trainer, "_logger_connector", None), "_callback_metrics", None)
    if not isinstance(target, dict):
        target = trainer.callback_metrics
    target.update({name: torch.tensor(value) for name, value in metrics.items()})
