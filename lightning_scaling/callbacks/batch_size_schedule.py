"""BatchSizeSchedule: let the measured gradient noise scale raise the global batch while training, by doubling
``accumulate_grad_batches`` (McCandlish et al. 2018, arXiv 1812.06162; Smith et al. 2017, arXiv 1711.00489)."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_scaling import metric_names
from lightning_scaling.argument_checks import one_of, positive_float, positive_int
from lightning_scaling.callbacks._common import WarnOnce
from lightning_scaling.callbacks.gradient_noise_scale import GradientNoiseScale

LR_SCALING = ("none", "linear", "sqrt")
# the learning-rate multiplier of one doubling of the batch, per rule
_LR_STEP = {"none": 1.0, "linear": 2.0, "sqrt": math.sqrt(2.0)}
# per-parameter-group keys that torch's schedulers read as learning rates (OneCycleLR keeps three of them)
_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


class BatchSizeSchedule(Callback):
    r"""Double the global batch (through ``trainer.accumulate_grad_batches``) whenever the measured gradient noise
    scale says a larger batch would cost few extra examples. Opt-in: add it beside a noise-scale measurement.

    McCandlish et al. 2018: training at batch B takes S = S_min(1 + B_noise/B) optimizer steps and
    E = E_min(1 + B/B_noise) examples to reach a given loss (their trade-off (S/S_min − 1)(E/E_min − 1) = 1),
    with B_noise ≈ B_simple = tr(Σ)/|G|² (the trace of the per-sample gradient covariance over the squared mean
    gradient). While B is well below B_noise, doubling B nearly halves the steps to a given loss for few extra
    examples; and B_noise grows as the loss falls, so a batch that was right early becomes too small later. This
    callback follows it: after each optimizer step it compares the smoothed B_simple (in samples) with the global
    batch B in use (samples per optimizer step, all ranks), and when B_simple > ``trigger_ratio`` × B on
    ``patience`` consecutive steps it doubles ``accumulate_grad_batches``, up to ``max_accumulate_grad_batches``.
    With the default ratio 2 the doubled batch is still at or below B_simple, so each doubling is predicted to take
    at most 2/3 of the steps for at most 4/3 of the examples (for the same progress); the message gives the
    predicted figures of each change.
    This is the "increase the batch instead of decaying the learning rate" schedule of Smith et al. 2017, driven
    by the measured noise scale, as AdaptDL (Qiao et al. 2021, OSDI) and Gray et al. 2024 (arXiv 2411.00999,
    batch-size schedules) do. The batch only ever grows; a noisy estimate cannot make it oscillate.

    Where B_simple comes from: the :class:`GradientNoiseScale` on the same Trainer, alone or inside
    :class:`ScalingMonitor` (the first one in ``trainer.callbacks`` order; found by class). Without one, ``fit``
    raises ``ValueError`` at setup: the schedule never measures anything itself, and a hidden second measurement
    would be surprising. Its estimate comes from numbers all-reduced over the data-parallel ranks; every input of
    the decision (that estimate, the global batch, ``global_step``, the batch index, the accumulation) is the same
    on every rank, so every rank changes its accumulation at the same micro-batch with no collective of its own.

    When a change lands: never inside an accumulation window. Lightning steps the optimizer after micro-batch
    ``batch_idx`` when ``(batch_idx + 1) % accumulate_grad_batches == 0`` (or at the epoch's last batch) and
    zeroes the gradients before micro-batch ``batch_idx`` when ``batch_idx % accumulate_grad_batches == 0``. A
    change from k to 2k is made only between two optimizer steps, and only when the next micro-batch's index is a
    multiple of 2k (at most one step after the decision), so that both rules agree for the old and the new value:
    every window holds exactly k or 2k micro-batches, except the short last window of an epoch that Lightning
    itself makes when the epoch length is not a multiple of k (whose step is not counted as the batch in use).

    The learning rate (``lr_scaling``): ``"none"`` keeps it (Smith et al. 2017: a larger batch then acts as a
    learning-rate decay); ``"linear"`` doubles it with the batch (Goyal et al. 2017, SGD); ``"sqrt"`` multiplies it
    by √2 (the square-root rule for Adam-type optimizers, Malladi et al. 2022, arXiv 2205.10287). The factor is
    applied to every optimizer's parameter groups (``lr`` and, where present, ``initial_lr``, ``max_lr``,
    ``min_lr``) and to every learning-rate scheduler's ``base_lrs`` (and CyclicLR's ``max_lrs``, and the schedulers
    inside SequentialLR/ChainedScheduler), so that LambdaLR, StepLR, cosine, OneCycleLR and warm-up schedules keep
    their shape at the new scale. Absolute floors (``eta_min`` of cosine schedules, ReduceLROnPlateau's
    ``min_lrs``) are left as they are.

    Length of the run: a larger batch trains on more samples per optimizer step. A run limited by ``max_epochs``
    (or by a token budget) keeps its number of samples and ends after fewer optimizer steps; a run limited by
    ``max_steps`` keeps its steps and trains on more samples. A learning-rate schedule whose length was set from
    ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` does not know about later changes: under
    ``max_epochs`` it will not have reached its end when the data runs out. Schedule the learning rate by samples
    or tokens seen when you use this callback with ``max_epochs``.

    Logged to every logger at each change, at the step after which it applies: ``scaling/accumulate_grad_batches``
    (the new value), ``scaling/global_batch`` (the new global batch: samples per optimizer step, all ranks) and
    ``scaling/lr_factor`` (the product of the learning-rate factors applied so far). The accumulation and the factor
    in force are also logged at train start. Each change is said once, in words, on rank zero.

    Checkpoints: the accumulation in force, the learning-rate factor and the decision state are saved; a resumed
    run continues with them (the optimizer and scheduler checkpoints already hold the scaled learning rates).
    ``configure_optimizers`` still sees the Trainer's initial ``accumulate_grad_batches`` on resume, as it did in
    the first run; the restored value is set in ``on_fit_start``.

    Not supported (``ValueError`` at setup): manual optimization, strategies that accumulate gradients themselves
    (DeepSpeed), and Lightning's ``GradientAccumulationScheduler`` on the same Trainer (both would set
    ``accumulate_grad_batches``).

    Args:
        max_accumulate_grad_batches: the largest ``accumulate_grad_batches`` to reach (a whole number >= the
            Trainer's). The accumulation goes k, 2k, 4k, ... from the Trainer's k and stops at the last of those
            that does not exceed this; memory stays that of one micro-batch, the time per step grows with it.
        trigger_ratio: double the batch when the smoothed B_simple exceeds ``trigger_ratio`` × the global batch in
            use (both in samples; > 0). 2 keeps the doubled batch at or below B_simple. Adam tends to have a
            critical batch size above B_simple (McCandlish 2018); a smaller ratio follows that.
        patience: optimizer steps in a row on which the condition must hold before a change (>= 1): the
            hysteresis that keeps one noisy estimate from doubling the batch.
        min_steps_between_changes: optimizer steps after a change before the next one (>= 1); the smoothed
            estimate and the optimizer's moments settle at the new batch meanwhile.
        min_measurements: noise-scale measurements (optimizer steps measured) before the first change (>= 1).
        lr_scaling: ``"none"``, ``"linear"`` or ``"sqrt"``: how the learning rate follows each doubling.
    """

    def __init__(
        self,
        max_accumulate_grad_batches: int,
        trigger_ratio: float = 2.0,
        patience: int = 3,
        min_steps_between_changes: int = 50,
        min_measurements: int = 20,
        lr_scaling: str = "none",
    ) -> None:
        super().__init__()
        self.max_accumulate_grad_batches = positive_int("max_accumulate_grad_batches", max_accumulate_grad_batches)
        self.trigger_ratio = positive_float("trigger_ratio", trigger_ratio)
        self.patience = positive_int("patience", patience)
        self.min_steps_between_changes = positive_int("min_steps_between_changes", min_steps_between_changes)
        self.min_measurements = positive_int("min_measurements", min_measurements)
        self.lr_scaling = one_of("lr_scaling", lr_scaling, LR_SCALING)

        # persistent state (state_dict)
        self.accumulate_grad_batches: int | None = None  # in force for the next micro-batch (None before fit)
        self.lr_factor = 1.0  # product of the learning-rate factors applied so far
        self.changes: list[dict[str, float]] = []  # one entry per change, in order
        self._streak = 0  # consecutive evaluated steps with B_simple > trigger_ratio × batch
        self._evaluated_step = -1  # the last global_step whose outcome was evaluated
        self._last_change_step: int | None = None
        # run-time
        self.noise_scale: GradientNoiseScale | None = None
        self._decide_at_batch_end = True  # the noise scale runs before us at batch end (else: at the next start)
        self._restored: int | None = None
        self._last_batch_idx: int | None = None
        self._warn = WarnOnce(type(self).__name__)

    # ------------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        callbacks: list[Callback] = list(trainer.callbacks)  # type: ignore[attr-defined]
        if any(isinstance(cb, GradientAccumulationScheduler) for cb in callbacks):
            raise ValueError(
                "BatchSizeSchedule and GradientAccumulationScheduler both set accumulate_grad_batches; "
                "use one of them on a Trainer"
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "BatchSizeSchedule needs automatic optimization (it changes Lightning's gradient "
                "accumulation, which manual optimization does not use)"
            )
        if trainer.strategy.handles_gradient_accumulation:
            raise ValueError(
                f"BatchSizeSchedule cannot change the accumulation of {type(trainer.strategy).__name__}, "
                "which accumulates gradients itself; use DDP or a single device"
            )
        k = int(trainer.accumulate_grad_batches)
        if self.max_accumulate_grad_batches < k:
            raise ValueError(
                f"max_accumulate_grad_batches ({self.max_accumulate_grad_batches}) is below the "
                f"Trainer's accumulate_grad_batches ({k}); set it to {k} or more"
            )
        found = _find_noise_scale(callbacks)
        if found is None:
            raise ValueError(
                "BatchSizeSchedule reads the gradient noise scale: add GradientNoiseScale() or "
                "ScalingMonitor() to the Trainer's callbacks, beside BatchSizeSchedule"
            )
        self.noise_scale, holder = found
        self._decide_at_batch_end = _index(callbacks, holder) < _index(callbacks, self)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after configure_optimizers (which saw the Trainer's own accumulation, as in the first run) and after
        # load_state_dict; before the loops and the other callbacks' on_train_start read the accumulation
        if self._restored is not None:
            if self._restored > self.max_accumulate_grad_batches:
                raise ValueError(
                    f"max_accumulate_grad_batches ({self.max_accumulate_grad_batches}) is below the "
                    f"accumulation this run resumes with ({self._restored}); set it to "
                    f"{self._restored} or more"
                )
            trainer.accumulate_grad_batches = self._restored
            self._restored = None
        self.accumulate_grad_batches = int(trainer.accumulate_grad_batches)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, int(trainer.global_step), self._metrics())

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._decide_at_batch_end:  # the noise scale has taken the last step's record by now
            if batch_idx > 0:
                previous: int | None = batch_idx - 1
            else:  # the previous micro-batch ended an epoch (unknown right after a resume: assume a whole window)
                previous = self._last_batch_idx
            self._step_ended(trainer, completed_batch_idx=previous, next_batch_idx=batch_idx)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._last_batch_idx = batch_idx
        if self._decide_at_batch_end and not _training_ends(trainer, batch_idx):
            last = trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches
            self._step_ended(trainer, completed_batch_idx=batch_idx, next_batch_idx=0 if last else batch_idx + 1)

    # ------------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "accumulate_grad_batches": self.accumulate_grad_batches,
            "lr_factor": self.lr_factor,
            "changes": [dict(c) for c in self.changes],
            "streak": self._streak,
            "evaluated_step": self._evaluated_step,
            "last_change_step": self._last_change_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        k = state_dict.get("accumulate_grad_batches")
        self._restored = None if k is None else int(k)
        self.accumulate_grad_batches = self._restored
        self.lr_factor = float(state_dict.get("lr_factor", 1.0))
        self.changes = [dict(c) for c in state_dict.get("changes", [])]
        self._streak = int(state_dict.get("streak", 0))
        self._evaluated_step = int(state_dict.get("evaluated_step", -1))
        last = state_dict.get("last_change_step")
        self._last_change_step = None if last is None else int(last)

    def summary(self) -> dict[str, Any]:
        """The accumulation in force, the learning-rate factor and every change so far (step, accumulation
        before and after, B_simple and the global batch before the change, in samples)."""
        return {
            "accumulate_grad_batches": self.accumulate_grad_batches,
            "lr_factor": self.lr_factor,
            "changes": [dict(c) for c in self.changes],
        }

    # ------------------------------------------------------------------------------------------- internals
    def _step_ended(self, trainer: Trainer, completed_batch_idx: int | None, next_batch_idx: int) -> None:
        """Called at micro-batch boundaries; acts once per completed optimizer step. ``completed_batch_idx``: the
        micro-batch that ended the step (None: not known), ``next_batch_idx``: the one that comes next."""
        step = int(trainer.global_step)
        if step <= max(self._evaluated_step, 0):
            return  # no optimizer step since the last evaluation (inside an accumulation window)
        self._evaluated_step = step
        k = int(trainer.accumulate_grad_batches)
        if completed_batch_idx is not None and (completed_batch_idx + 1) % k != 0:
            return  # an epoch's short last window: its batch is not the batch in use; the next step decides
        if not self._wants_to_double(step, k):
            return
        if 2 * k > self.max_accumulate_grad_batches:
            self._warn.info(
                "at-max",
                f"the noise scale calls for a larger batch, but accumulate_grad_batches is at "
                f"max_accumulate_grad_batches={self.max_accumulate_grad_batches}; more "
                "data-parallel devices (or a larger maximum) would follow it further",
            )
            return
        if next_batch_idx % (2 * k) != 0:
            return  # the next micro-batch would sit inside a window of 2k: try again after the next step
        self._double(trainer, step, k)

    def _wants_to_double(self, step: int, k: int) -> bool:
        gns = self.noise_scale
        assert gns is not None
        if not gns.enabled:
            self._warn.warn(
                "gns-off",
                f"the GradientNoiseScale it reads is switched off, so the batch stays at accumulate_grad_batches={k}",
            )
            self._streak = 0
            return False
        estimate = gns.estimate()
        if estimate.measurements < self.min_measurements:
            if estimate.measurements == 0 and step >= 10 * self.min_measurements:
                self._warn.warn(
                    "no-measurements",
                    f"no noise-scale measurement after {step} optimizer steps, so the "
                    f"batch stays at accumulate_grad_batches={k}; the noise scale "
                    "needs two batch sizes (accumulate_grad_batches >= 2 or several "
                    "devices, or normalization layers where it supports them)",
                )
            self._streak = 0
            return False
        b_simple, batch = estimate.b_simple, float(gns.batch_size)
        if not (math.isfinite(b_simple) and math.isfinite(batch) and batch > 0):
            self._streak = 0
            return False
        self._streak = self._streak + 1 if b_simple > self.trigger_ratio * batch else 0
        if self._streak < self.patience:
            return False
        return self._last_change_step is None or step - self._last_change_step >= self.min_steps_between_changes

    def _double(self, trainer: Trainer, step: int, k: int) -> None:
        gns = self.noise_scale
        assert gns is not None
        estimate = gns.estimate()
        batch = float(gns.batch_size)  # the global batch of the step just taken, at accumulation k
        trainer.accumulate_grad_batches = 2 * k
        self.accumulate_grad_batches = 2 * k
        lr_step = _LR_STEP[self.lr_scaling]
        if lr_step != 1.0:
            _scale_learning_rates(trainer, lr_step)
        self.lr_factor *= lr_step
        self._last_change_step = step
        self._streak = 0
        self.changes.append(
            {"step": step, "from": k, "to": 2 * k, "b_simple": estimate.b_simple, "global_batch": batch}
        )
        self._log(trainer, step, self._metrics(2 * batch))
        rank_zero_info(self._describe(step, k, estimate.b_simple, estimate.stderr, batch, lr_step))

    def _describe(self, step: int, k: int, b_simple: float, stderr: float, batch: float, lr_step: float) -> str:
        gns = self.noise_scale
        assert gns is not None
        tokens = gns.tokens_per_sample
        in_tokens = f" ({2 * batch * tokens:,.0f} tokens)" if math.isfinite(tokens) else ""
        spread = f" ± {stderr:,.0f}" if math.isfinite(stderr) else ""
        r = b_simple / batch
        steps_ratio = (1 + r / 2) / (1 + r)  # S(2B)/S(B) with S = S_min(1 + B_noise/B)
        examples_ratio = (1 + 2 / r) / (1 + 1 / r)  # E(2B)/E(B) with E = E_min(1 + B/B_noise)
        lr = {
            "none": "the learning rate is unchanged",
            "linear": "the learning rate doubles with it (linear rule)",
            "sqrt": f"the learning rate is multiplied by {lr_step:.3f} (square-root rule)",
        }[self.lr_scaling]
        if self.lr_scaling != "none":
            lr += f", {self.lr_factor:.3g}x its initial value in all"
        return (
            f"{type(self).__name__}: after optimizer step {step}, the gradient noise scale B_simple ≈ "
            f"{b_simple:,.0f}{spread} samples is {r:.1f}x the global batch of {batch:,.0f} samples (above "
            f"trigger_ratio={self.trigger_ratio:g}), so the batch doubles: accumulate_grad_batches {k} -> {2 * k}, "
            f"global batch {2 * batch:,.0f} samples{in_tokens}; {lr}. McCandlish et al. 2018 predict "
            f"{steps_ratio:.2f}x the optimizer steps for {examples_ratio:.2f}x the examples per unit of progress."
        )

    @staticmethod
    def _log(trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        """To every logger at ``step`` (the first optimizer step the values apply to: the same whichever hook the
        change was made in), and to ``trainer.callback_metrics``."""
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})

    def _metrics(self, global_batch: float | None = None) -> dict[str, float]:
        metrics = {
            metric_names.ACCUMULATE_GRAD_BATCHES: float(self.accumulate_grad_batches or 0),
            metric_names.LR_FACTOR: self.lr_factor,
        }
        if global_batch is not None:
            metrics[metric_names.GLOBAL_BATCH] = global_batch
        return metrics


def _find_noise_scale(callbacks: list[Callback]) -> tuple[GradientNoiseScale, Callback] | None:
    """The first GradientNoiseScale in callback order, alone or inside a ScalingMonitor, and the callback that
    holds it (itself, or the monitor); None when there is none."""
    from lightning_scaling.callbacks.scaling_monitor import ScalingMonitor

    for callback in callbacks:
        if isinstance(callback, GradientNoiseScale):
            return callback, callback
        if isinstance(callback, ScalingMonitor):
            for part in callback.parts.values():
                if isinstance(part, GradientNoiseScale):
                    return part, callback
    return None


def _index(callbacks: list[Callback], target: Callback) -> int:
    return next(i for i, callback in enumerate(callbacks) if callback is target)


def _training_ends(trainer: Trainer, batch_idx: int) -> bool:
    """Whether no micro-batch follows this one (the step limit, or the last batch of the last epoch)."""
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    last_batch = trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches
    max_epochs = trainer.max_epochs
    return bool(last_batch and max_epochs is not None and max_epochs != -1 and trainer.current_epoch + 1 >= max_epochs)


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value.mul_(factor)  # in place: a tensor learning rate may be captured (CUDA graphs)
    return value * factor


def _scale_learning_rates(trainer: Trainer, factor: float) -> None:
    """Multiply every learning rate the optimizers and schedulers hold by ``factor``."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            for key in _GROUP_LR_KEYS:
                if (
                    key in group
                    and isinstance(group[key], (int, float, torch.Tensor))
                    and not isinstance(group[key], bool)
                ):
                    group[key] = _scaled(group[key], factor)
    for config in trainer.lr_scheduler_configs:
        _scale_scheduler(config.scheduler, factor)


def _scale_scheduler(scheduler: Any, factor: float) -> None:
    for attribute in ("base_lrs", "max_lrs"):
        values = getattr(scheduler, attribute, None)
        if isinstance(values, list):
            setattr(scheduler, attribute, [_scaled(v, factor) for v in values])
    for inner in getattr(scheduler, "_schedulers", None) or ():  # SequentialLR, ChainedScheduler
        _scale_scheduler(inner, factor)
