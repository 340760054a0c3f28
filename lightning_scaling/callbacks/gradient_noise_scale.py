"""GradientNoiseScale: the gradient noise scale B_simple (≈ the critical batch size), live, from gradients that
Lightning already computes (McCandlish et al. 2018, arXiv 1812.06162, §2.2 and App. A.1)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from typing_extensions import override

from lightning_scaling import metric_names
from lightning_scaling.argument_checks import fraction, positive_float, positive_int
from lightning_scaling.callbacks._base import LedgerCallback, guarded
from lightning_scaling.callbacks._common import TokensFn
from lightning_scaling.callbacks._ledger import SAMPLES, StepRecord
from lightning_scaling.callbacks._norm_layers import NormLayerProbe
from lightning_scaling.estimators.noise_scale import NoiseScaleEstimate, NoiseScaleEstimator, least_squares_line

# The step's least-squares sums over (x = 1/B, y = |G_B|²) points: Σw, Σw·x, Σw·x², Σw·y, Σw·x·y.
_POINT_SLOTS = ("gns/points", "gns/x", "gns/xx", "gns/y", "gns/xy")
_NORM_SLOTS = ("gns_norm/points", "gns_norm/x", "gns_norm/xx", "gns_norm/y", "gns_norm/xy")  # the norm layers' own
_NORM_MISMATCHED = "gns_norm/mismatched"  # norm layers whose per-example sum missed autograd's gradient
# The gradient hooks keep each parameter's incoming gradient and take the squared norms of the lot in one fused call
# (one call per parameter costs 3x more on a small model); at most this many bytes are kept before they are normed.
_HELD_GRADIENT_BYTES = 32 * 2**20
# The warning that the batch is far above B_simple says B_simple is still rising when it grew this many times over the
# last _HISTORY_POINTS points of its history (one point every min_measurements measurements).
_RISING = 1.5
_HISTORY_POINTS = 4

# Strategies that shard or hide the per-rank gradient (by class name, so optional packages are not imported).
_NO_LOCAL_GRADIENTS = (
    "FSDPStrategy",
    "DeepSpeedStrategy",
    "ModelParallelStrategy",
    "XLAStrategy",
    "SingleDeviceXLAStrategy",
    "XLAFSDPStrategy",
)


class GradientNoiseScale(LedgerCallback):
    r"""Estimate the gradient noise scale B_simple = tr(Σ)/|G|² while training and compare it with the batch in use.

    B_simple approximates the critical batch size (McCandlish 2018): training at batch B costs
    S = S_min(1 + B_noise/B) optimizer steps and E = E_min(1 + B/B_noise) examples. Far above it, extra examples
    buy few steps; far below it, more data parallelism would cost few extra examples. With Adam the critical
    batch size tends to be larger than B_simple; read the estimate as good to within an order of magnitude.

    Where the two batch sizes come from (no copy of the gradients, no extra pass):

    * gradient accumulation (``accumulate_grad_batches = k > 1``): a hook on each parameter sees every
      micro-batch's gradient before it is summed into ``.grad``; the small batch is a micro-batch (b samples),
      the big one the optimizer step's gradient (k·b samples). Costs one fused norm per micro-batch: on one device
      the first micro-batch's gradient is all of ``.grad`` after its backward; for the others the hooks keep each
      incoming gradient until the backward ends (at most 32 MiB at a time, normed whenever that fills) where
      autograd would have dropped it after adding it to ``.grad``.
      (The partial sums that ``.grad`` holds between micro-batches would need no hooks, but their nested
      differences estimate tr(Σ) with a standard deviation 7–10x larger on the example GPT: many times the steps
      for the same precision.)
    * DDP (``world_size = R > 1``): each rank's local gradient (hooks, before the all-reduce) against the
      all-reduced ``.grad`` (R·b samples); with accumulation too, R·k micro-batches against R·k·b samples.
    * the normalization layers (on by default, ``norm_layers=True``): per-example gradients of the LayerNorm /
      RMSNorm parameters, formed in the backward from tensors autograd already has (Gray et al. 2024, arXiv
      2411.00999), give a batch of one against the micro-batch for those parameters. Where there is neither
      accumulation nor DDP this is the estimate (``scaling/gns``, ``mode == "norm layers"``); otherwise it is
      logged beside the whole-model one as ``scaling/gns_norm_layers``. The layers found are named once; a model
      without norm layers gets one line saying so, and with neither of the other sources nothing is logged. It
      never re-runs ``training_step``.

    Each step's squared norms are points (1/B, |G_B|²) on the line E|G_B|² = |G|² + tr(Σ)/B; their
    least-squares sums ride in the shared step ledger (no collective or host read of its own), and the line's
    intercept and slope are the step's unbiased |G|² and tr(Σ) (McCandlish 2018, App. A.1, with several small
    batches).

    Correct under AMP (hook-seen gradients carry the loss scale: squared norms are divided by scale²),
    Lightning's division of the loss by ``accumulate_grad_batches`` (a micro-batch gradient is k times what the
    hook sees), gradient clipping (measured in ``on_before_optimizer_step``, after unscaling and before
    clipping), and non-finite steps (skipped and counted). Under FSDP, DeepSpeed and other sharded strategies the
    local gradients are not available: it warns once and steps aside. Manual optimization: steps aside.

    The micro-batch loss must be a mean over its samples (the usual case); batch sizes are in samples (the
    leading dimension of the batch's first tensor), and in tokens where the batch holds token ids (or through
    ``tokens_fn``).

    Logged at the trainer's logging interval (``log_every_n_steps``):
        ``scaling/gns``: B_simple in samples. ``scaling/gns_tokens``: the same in tokens.
        ``scaling/grad_sq``: smoothed |G|² estimate. ``scaling/grad_trace_cov``: smoothed tr(Σ) estimate
        (per-sample gradient covariance). ``scaling/batch_size``: global samples per optimizer step.
        ``scaling/batch_tokens``: global tokens per optimizer step. ``scaling/kaplan_critical_batch_tokens``:
        Kaplan 2020's B_crit(L) at the step's mean training loss (the loss ``training_step`` returns, read
        as nats per token), for language models only.

    Args:
        ema_decay: decay of the exponential moving averages of |G|² and tr(Σ), per measurement, in (0, 1). The
            averages cover about (1 + d)/(1 − d) measurements (199 at 0.99).
        warmup_steps: optimizer steps before the batch is compared with B_simple (the noise scale is near zero
            early in training), >= 0.
        high_ratio: warn once when the batch in use exceeds ``high_ratio`` × B_simple (> 1); the warning says when
            B_simple grew 1.5x or more over the last 3-4 × ``min_measurements`` measurements (still rising).
        low_ratio: warn once when the batch in use falls below ``low_ratio`` × B_simple (in (0, 1)).
        hysteresis: a warning direction re-arms only after the ratio comes back inside the band by this
            factor (> 1); each direction still warns at most once per run.
        min_measurements: measurements needed before warning (>= 1).
        tokens_fn: ``tokens_fn(batch)`` -> training tokens in one micro-batch (default: count token ids).
        norm_layers: also estimate the noise scale from the normalization layers' per-example gradients (the only
            source on one device without accumulation).
        norm_layers_every_n_steps: measure the normalization layers on every n-th optimizer step (>= 1). Their
            per-example gradients are two products over the layer's output per layer (about 1.5-3% of a step of
            the small example GPT on a CPU, a smaller share the wider the model and on a GPU); every 4th step keeps
            that under 1%, and the smoothing covers ``(1 + d)/(1 - d)`` measurements either way.
        norm_layers_scale: the factor (> 0) that turns the normalization layers' B_simple into the whole model's,
            applied where they are the only source. Their own noise scale is lower than the whole model's: 0.39 to
            0.62 of it on the example GPT, measured with exact per-example gradients of every parameter
            (``benchmarks/noise_scale_by_layer.py``), so without a factor the estimate reads about half. To
            calibrate a model family, train a few hundred steps with ``accumulate_grad_batches=2`` and pass
            ``summary()["whole_over_norm_layers"]``. Default 1: the norm layers' own figure, said once as such.
    """

    def __init__(
        self,
        ema_decay: float = 0.99,
        warmup_steps: int = 100,
        high_ratio: float = 4.0,
        low_ratio: float = 0.25,
        hysteresis: float = 1.5,
        min_measurements: int = 20,
        tokens_fn: TokensFn | None = None,
        norm_layers: bool = True,
        norm_layers_every_n_steps: int = 4,
        norm_layers_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.estimator = NoiseScaleEstimator(fraction("ema_decay", ema_decay, inclusive_high=False))
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= 2**53:
            raise ValueError(f"warmup_steps must be a whole number >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.high_ratio = positive_float("high_ratio", high_ratio)
        if self.high_ratio <= 1:
            raise ValueError(f"high_ratio must be > 1, got {high_ratio!r}")
        self.low_ratio = fraction("low_ratio", low_ratio, inclusive_high=False)
        self.hysteresis = positive_float("hysteresis", hysteresis)
        if self.hysteresis <= 1:
            raise ValueError(f"hysteresis must be > 1, got {hysteresis!r}")
        self.min_measurements = positive_int("min_measurements", min_measurements)
        if tokens_fn is not None and not callable(tokens_fn):
            raise ValueError(f"tokens_fn must be callable or None, got {tokens_fn!r}")
        self.tokens_fn = tokens_fn
        if not isinstance(norm_layers, bool):
            raise ValueError(f"norm_layers must be True or False, got {norm_layers!r}")
        self.norm_layers = norm_layers
        self.norm_layers_every_n_steps = positive_int("norm_layers_every_n_steps", norm_layers_every_n_steps)
        self.norm_layers_scale = positive_float("norm_layers_scale", norm_layers_scale)
        # the normalization layers' own estimate (Gray et al. 2024), beside or instead of the whole model's
        self.norm_estimator = NoiseScaleEstimator(self.estimator.ema_decay)
        self.norm_layers_found = ""  # e.g. "9 x LayerNorm"
        self._probe = NormLayerProbe()
        self._probe_on = False
        self._probe_checked = False
        self._norm_layers_missing = ""

        # persistent state (state_dict)
        self.skipped_nonfinite = 0  # optimizer steps whose gradients were not finite
        self.zone = "ok"  # "ok", "high" or "low": where the batch sits relative to B_simple (with hysteresis)
        self.warned: set[str] = set()
        # last measured step (for logs and the end-of-fit report)
        self.batch_size: float = math.nan  # global samples per optimizer step
        self.batch_tokens: float = math.nan  # global tokens per optimizer step (NaN when unknown)
        self.last_loss: float = math.nan  # mean training loss of the last step (nats per token for an LM)
        # run-time bookkeeping
        self.mode = "off"  # "hooks" (accumulation and/or DDP) or "off"
        self.status = "not started"  # why there is (or is not) an estimate, in words
        self._k = 1  # accumulate_grad_batches the mode was chosen for
        self._world = 1
        self._rule = "tokens"
        self._handles: list[Any] = []
        self._params: list[torch.nn.Parameter] = []
        self._norms: list[torch.Tensor] = []  # squared norms of parts of this micro-batch's gradient
        self._held: list[torch.Tensor] = []  # incoming gradients not normed yet (see _make_hook)
        self._held_bytes = 0
        self._hook_error: BaseException | None = None
        self._collecting = False
        self._micro = 0  # micro-batches measured since the last optimizer step (this rank)
        self._micro_samples: int | None = None
        self._window_inverse = 0.0  # Σ 1/b over those micro-batches (this rank), b in samples
        self._norm_dtype = torch.float32
        self._hooks_live = True  # whether the gradient hooks measure this micro-batch (see _on_micro_batch_start)
        self._hooks_hold = False  # whether they keep the incoming gradients (.grad exists: see _make_hook)
        # (measurements, B_simple) every min_measurements measurements, the last few: how fast B_simple moves
        self._history: list[tuple[int, float]] = []

    # ----------------------------------------------------------------------------------------------------------
    # public
    def estimate(self) -> NoiseScaleEstimate:
        """Current B_simple and its standard error, in samples (NaN before there is one)."""
        return self.estimator.estimate()

    @property
    def tokens_per_sample(self) -> float:
        return self.batch_tokens / self.batch_size if self.batch_size > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        """The numbers for the end-of-fit report (B_simple in samples and tokens, the batch in use), and
        ``status``: why there is an estimate or not, in words."""
        est = self.estimate()
        return {
            "gns": est.b_simple,
            "gns_stderr": est.stderr,
            "gns_tokens": est.b_simple * self.tokens_per_sample,
            "batch_size": self.batch_size,
            "batch_tokens": self.batch_tokens,
            "batch_over_gns": self.batch_size / est.b_simple if est.b_simple > 0 else math.nan,
            "grad_sq": est.grad_sq,
            "grad_trace_cov": est.trace_cov,
            "measurements": est.measurements,
            "skipped_nonfinite": self.skipped_nonfinite,
            "mode": self.mode,
            "gns_norm_layers": self.norm_estimator.b_simple,
            "whole_over_norm_layers": self._whole_over_norm_layers(est),
            "norm_layers_scale": self.norm_layers_scale,
            "norm_layers_found": self.norm_layers_found,
            "status": self._status_text(est),
        }

    # ----------------------------------------------------------------------------------------------------------
    # hooks, in the order Lightning runs them
    @override
    def _on_setup_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.ledger is not None
        self._rule = self.ledger.token_rule(self.tokens_fn)
        # sums over the step's (1/B, |G_B|²) points, for the least-squares line (see _commit)
        self.ledger.declare(*_POINT_SLOTS, *_NORM_SLOTS, _NORM_MISMATCHED)
        names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        if names & set(_NO_LOCAL_GRADIENTS) or not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            self._step_aside(
                f"{type(trainer.strategy).__name__} does not expose each rank's local gradient "
                "(sharded or compiled gradients), so the noise scale cannot be measured; stepping aside."
            )
            return
        if not pl_module.automatic_optimization:
            self._step_aside(
                "manual optimization is not supported (Lightning's accumulation and clipping hooks "
                "are not in charge); stepping aside."
            )

    @override
    def _on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        self._configure(trainer, pl_module)

    @override
    @guarded
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset_window()

    @override
    def _on_micro_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if int(trainer.accumulate_grad_batches) != self._k:  # a GradientAccumulationScheduler changed it
            self._reset_window()
            self._configure(trainer, pl_module)
        if self.mode == "off" and not self._probe_on:
            return
        assert self.ledger is not None
        samples = self.ledger.micro_samples
        if samples == 0:  # an empty batch: nothing to measure in this micro-batch
            self._collecting = False
            return
        if samples is None:
            self._step_aside(
                "cannot count the samples in a batch (no tensor with a leading batch dimension); stepping aside."
            )
            return
        self._micro_samples = samples
        self._collecting = True
        # One device: the window's first micro-batch gradient is all of .grad after its backward (Lightning zeroes
        # .grad before it), so one fused norm in on_after_backward replaces its per-parameter hooks. Under DDP
        # the hooks are needed: a micro-batch that ends the step is all-reduced by the time the backward returns.
        # The hooks stay on for the whole fit and return at once where they do not measure: a call that returns
        # costs about a microsecond per parameter, putting them on and off around each micro-batch 10-20 µs.
        self._hooks_live = not (self._micro == 0 and self._world == 1)
        # after the window's first micro-batch .grad exists, so autograd adds each incoming gradient to it and drops it
        self._hooks_hold = self._micro > 0
        if self._probe_on and trainer.global_step % self.norm_layers_every_n_steps == 0:
            # check each layer's formula once, on a micro-batch whose .grad will be its own gradient
            self._probe.start(samples, check=not self._probe_checked and self._micro == 0 and self._world == 1)

    @override
    def _on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # once per backward, i.e. per micro-batch
        if self._hook_error is not None:
            raise self._hook_error
        if not self._collecting:
            return
        assert self._micro_samples
        self._collecting = False
        if self._probe_on:
            self._collect_norm_layers(trainer)
        if self.mode != "hooks":
            return
        self._micro += 1
        self._window_inverse += 1.0 / self._micro_samples
        sq: torch.Tensor | None = None
        if not self._hooks_live:
            sq = self._grad_sq()  # .grad is this first micro-batch's gradient × loss scale / k
        else:  # the hooks saw this micro-batch's own gradient × loss scale / k
            self._norm_held()
            if self._norms:
                dtype = self._norm_dtype
                sq = torch.stack([n if n.dtype == dtype else n.to(dtype) for n in self._norms]).sum()
        self._norms = []
        if sq is not None:  # a point at B = b (stays on the device: no host read)
            scale = self._loss_scale(trainer)
            self._commit(sq * (self._k * self._k) / (scale * scale), self._micro_samples, weight=1.0)

    def _collect_norm_layers(self, trainer: Trainer) -> None:
        found = self._probe.collect()
        if self._probe.error is not None:
            self._norm_layers_off(f"the normalization layers could not be measured ({self._probe.error})")
            return
        mismatched = self._probe.take_mismatched()
        if mismatched is not None:
            assert self.ledger is not None
            self._probe_checked = True
            self.ledger.add(_NORM_MISMATCHED, mismatched)
        if found is None:
            return
        example_sq, batch_sq, examples = found
        # the gradients flowed × loss scale / k, and each example's × 1/b from the mean over the micro-batch:
        # an example's own gradient is b·k/scale times its piece, the micro-batch's k/scale times their sum
        scale = self._loss_scale(trainer)
        factor = (self._k * self._k) / (scale * scale)
        self._commit(example_sq * (factor * examples), 1, weight=1.0, slots=_NORM_SLOTS)
        if examples > 1:
            self._commit(batch_sq * factor, examples, weight=1.0, slots=_NORM_SLOTS)

    def _norm_layers_off(self, why: str) -> None:
        self._probe.detach()
        self._probe_on = False
        self._warn.info("norm-layers-off", f"{why}; the noise scale from the normalization layers is off.")
        if self.mode == "norm layers":
            self.mode = "off"
            self.status = f"not measured: {why}"

    @override
    def _on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Lightning calls this after AMP's unscale_ and before gradient clipping (Precision._after_closure).
        try:
            if self.mode == "hooks" and self._micro > 0:
                # .grad = Σ_i g_i / k over the m micro-batches of this window: (k/m)·.grad is their mean, over the
                # R ranks too (all-reduced, the same on every rank: each adds 1/R of the point, the sum holds it once)
                scale = 1.0 if self._grads_unscaled(trainer, optimizer) else self._loss_scale(trainer)
                sq = self._grad_sq() * (self._k / self._micro) ** 2 / (scale * scale)
                # the equal-weight mean of m micro-batch means of b_i samples has the noise of m²/Σ(1/b_i) samples
                # (Σb_i when the b_i are equal)
                world = max(self._world, 1)
                self._commit(sq, world * self._micro * self._micro / self._window_inverse, weight=1.0 / world)
        finally:
            self._reset_window()

    @override
    def _on_step(self, trainer: Trainer, pl_module: LightningModule, record: StepRecord) -> dict[str, float] | None:
        if record.steps == 0 or (self.mode == "off" and not self._probe_on):
            return None
        assert self._rule is not None  # set with the ledger, in setup
        self.batch_size = record[SAMPLES]
        uncountable = record[f"{self._rule}/uncountable"] > 0
        self.batch_tokens = math.nan if uncountable else record.tokens(self._rule)
        self.last_loss = record.mean_loss
        if record[_NORM_MISMATCHED] > 0 and self._probe_on:
            count = int(record[_NORM_MISMATCHED] / max(record.world_size, 1))
            self._norm_layers_off(
                f"{count} of {len(self._probe.layers)} normalization layers did not reproduce "
                "their weight gradient with the LayerNorm/RMSNorm formula (a norm layer of an "
                "unusual kind)"
            )
        elif self._probe_on:
            norm_line = least_squares_line(*(record[name] for name in _NORM_SLOTS))
            if norm_line is not None and all(math.isfinite(v) for v in norm_line):
                self.norm_estimator.update_estimates(*norm_line)
                if self.mode == "norm layers":  # the only source: it is the estimate, B_simple times the scale
                    self._update(trainer, norm_line[0], norm_line[1] * self.norm_layers_scale)
        if self.mode == "hooks":
            line = least_squares_line(*(record[name] for name in _POINT_SLOTS))
            if line is not None:
                self._update(trainer, *line)
        if self.mode == "off" or not record.log_now:  # the metrics are built only when they are logged
            return None
        return self._metrics()

    @override
    def _on_micro_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any) -> None:
        # a skipped micro-batch (training_step returned None) ran no backward: nothing may leak into the next one
        self._collecting = False
        self._norms = []  # consumed by on_after_backward; anything left came from outside the step
        self._held, self._held_bytes = [], 0

    @override
    def _on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hooks()  # Lightning skips teardown after an exception (and what the hooks kept goes with them)
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()  # also when the callback switched itself off
        super().teardown(trainer, pl_module, stage)

    @override
    def _switched_off(self) -> None:
        self._remove_hooks()

    # ----------------------------------------------------------------------------------------------------------
    # state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator.state_dict(),
            "norm_estimator": self.norm_estimator.state_dict(),
            "skipped_nonfinite": self.skipped_nonfinite,
            "zone": self.zone,
            "warned": sorted(self.warned),
            "batch_size": self.batch_size,
            "batch_tokens": self.batch_tokens,
            "history": [list(point) for point in self._history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.estimator.load_state_dict(state_dict["estimator"])
        if "norm_estimator" in state_dict:
            self.norm_estimator.load_state_dict(state_dict["norm_estimator"])
        self.skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))
        self.zone = str(state_dict.get("zone", "ok"))
        self.warned = set(state_dict.get("warned", ()))
        self._warn.seen.update(self.warned)
        self.batch_size = float(state_dict.get("batch_size", math.nan))
        self.batch_tokens = float(state_dict.get("batch_tokens", math.nan))
        self._history = [(int(count), float(value)) for count, value in state_dict.get("history", ())]

    # ----------------------------------------------------------------------------------------------------------
    # internals
    def _whole_over_norm_layers(self, est: NoiseScaleEstimate) -> float:
        """The whole model's B_simple over the normalization layers' own, when both are measured (the factor for
        ``norm_layers_scale``); NaN otherwise."""
        norm = self.norm_estimator.b_simple
        if self.mode != "hooks" or not (est.b_simple > 0 and norm > 0 and math.isfinite(est.b_simple * norm)):
            return math.nan
        return est.b_simple / norm

    def _metrics(self) -> dict[str, float]:
        est = self.estimator
        metrics: dict[str, float] = {metric_names.BATCH_SIZE: self.batch_size}
        norm = self.norm_estimator.b_simple
        if self.norm_estimator.count and math.isfinite(norm) and norm > 0:
            metrics[metric_names.GNS_NORM_LAYERS] = norm
        if math.isfinite(self.batch_tokens):
            metrics[metric_names.BATCH_TOKENS] = self.batch_tokens
        if est.count:
            metrics[metric_names.GRAD_SQ] = est.grad_sq
            metrics[metric_names.GRAD_TRACE_COV] = est.trace_cov
            b_simple = est.b_simple
            if math.isfinite(b_simple) and b_simple > 0:
                metrics[metric_names.GNS] = b_simple
                if math.isfinite(self.tokens_per_sample):
                    metrics[metric_names.GNS_TOKENS] = b_simple * self.tokens_per_sample
        if math.isfinite(self.batch_tokens):
            kaplan = self._kaplan_critical_batch(self.last_loss)
            if kaplan is not None:
                metrics[metric_names.KAPLAN_CRITICAL_BATCH_TOKENS] = kaplan
        return metrics

    def _status_text(self, est: NoiseScaleEstimate) -> str:
        if self.mode == "off":
            return self.status
        if est.measurements < 2:
            return (
                f"too few measurements yet ({est.measurements}); the estimate needs at least 2 optimizer "
                "steps, and settles after about min_measurements of them"
            )
        if not (est.grad_sq > 0):
            return (
                "no signal yet: the smoothed |G|² estimate is not positive (gradient noise dominates the "
                "mean gradient, as early in training or on data without signal); train longer, or use a "
                "larger global batch"
            )
        if self.skipped_nonfinite:
            return f"measured ({self.skipped_nonfinite} non-finite step(s) skipped)"
        return "measured"

    def _reset_window(self) -> None:
        self._micro = 0
        self._window_inverse = 0.0
        self._norms = []
        self._collecting = False

    def _configure(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Pick where the two batch sizes come from, for the current accumulation and world size."""
        self._k = int(trainer.accumulate_grad_batches)
        self._world = int(trainer.world_size)
        self._remove_hooks()
        self._norm_dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32
        self._probe_on = self._configure_norm_layers(pl_module)
        if self._k > 1 or self._world > 1:
            self.mode = "hooks"
            self.status = "measuring"
            self._set_gradient_hooks(True)
        elif self._probe_on:
            self.mode = "norm layers"
            self.status = "measuring (per-example gradients of the normalization layers)"
        else:
            self.mode = "off"
            why = (
                ""
                if not self.norm_layers
                else f" and {self._norm_layers_missing} (the per-example source needs LayerNorm or RMSNorm layers)"
            )
            self.status = (
                "not measured: one device without gradient accumulation gives one batch size only"
                f"{why}; set Trainer(accumulate_grad_batches=2) or more (same global batch with half the "
                "micro-batch), or train on two or more devices"
            )
            self._warn.info("off", f"the gradient noise scale is {self.status}. Nothing is logged.")

    def _configure_norm_layers(self, pl_module: LightningModule) -> bool:
        """Find the norm layers and hook them; False (with the reason in ``_norm_layers_missing``) when not used."""
        self._norm_layers_missing = "norm_layers=False"
        if not self.norm_layers:
            return False
        if getattr(pl_module, "_compiler_ctx", None) or any(
            getattr(m, "_compiled_call_impl", None) is not None for m in pl_module.modules()
        ):
            self._norm_layers_missing = (
                "the model is compiled (torch.compile), where the norm-layer hooks would break graphs"
            )
            return False
        self.norm_layers_found = self._probe.find(pl_module)
        if not self.norm_layers_found:
            self._norm_layers_missing = "the model has no normalization layers it recognises"
            return False
        self._probe.attach()
        self._warn.info(
            "norm-layers",
            "per-example gradient norms from the normalization layers "
            f"({self.norm_layers_found}) give the noise scale a batch of one."
            + (
                ""
                if self.norm_layers_scale != 1.0 or self._k > 1 or self._world > 1
                else " Their noise scale reads about half the whole model's (0.4-0.6x on a small GPT): a run "
                "with accumulate_grad_batches=2 reports the factor (whole_over_norm_layers in the noise scale's "
                f"summary and the report) to pass as {self.option_hint('norm_layers_scale')}."
            ),
        )
        return True

    def _step_aside(self, message: str) -> None:
        self._warn.warn("step-aside", message)
        self.enabled = False
        self.mode = "off"
        self._probe_on = False
        self.status = "stepped aside: " + message
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        self._probe.detach()
        self._set_gradient_hooks(False)
        self._held, self._held_bytes, self._norms, self._hook_error = [], 0, [], None
        self._collecting = False

    def _set_gradient_hooks(self, on: bool) -> None:
        """Put a gradient hook on each of our parameters, or take them off (nothing when already so)."""
        if on and not self._handles:
            self._handles = [p.register_hook(self._make_hook(p)) for p in self._params]
        elif not on and self._handles:
            for handle in self._handles:
                with contextlib.suppress(Exception):
                    handle.remove()
            self._handles = []

    def _make_hook(self, param: torch.nn.Parameter) -> Any:
        nbytes = param.numel() * param.element_size()  # of its gradient (the hook runs ~20 µs cold: no extra calls)

        def hook(grad: torch.Tensor) -> None:
            # Sees one micro-batch's gradient of this parameter (times loss scale / k) before it joins .grad, on
            # the micro-batches the hooks measure (_on_micro_batch_start).
            if not (self._hooks_live and self._collecting and self.enabled):
                return
            try:
                if self._hooks_hold and nbytes < _HELD_GRADIENT_BYTES:
                    # autograd adds this tensor into .grad and drops it: keep it until the backward ends (or
                    # _HELD_GRADIENT_BYTES are kept) and norm the lot in one fused call. (A parameter without
                    # .grad yet would have it handed over: kept, autograd copies it instead, for that parameter.)
                    self._held.append(grad)
                    self._held_bytes += nbytes
                    if self._held_bytes >= _HELD_GRADIENT_BYTES:
                        self._norm_held()
                    return
                # the first micro-batch under DDP (autograd hands this tensor over as .grad), or a parameter too big
                # to keep: norm it now
                flat = grad.reshape(-1)
                if flat.dtype in (torch.float32, torch.float64):  # one dot product: the cheapest squared norm
                    self._norms.append(torch.dot(flat, flat))
                else:  # 16-bit gradients: accumulate in fp32
                    self._norms.append(torch.linalg.vector_norm(flat, dtype=torch.float32).square())
            except Exception as err:  # noqa: BLE001 - raised later, in our own hook, as a guarded error
                self._hook_error = err
                self._collecting = False
            return

        return hook

    def _norm_held(self) -> None:
        """Turn the incoming gradients the hooks kept into one squared norm in ``_norms`` and let them go."""
        held, self._held, self._held_bytes = self._held, [], 0  # let go of them even if the norm fails
        if held:
            self._norms.append(torch.stack(torch._foreach_norm(held, 2, dtype=self._norm_dtype)).square().sum())

    @staticmethod
    def _loss_scale(trainer: Trainer) -> torch.Tensor | float:
        """AMP's current loss scale (a device tensor, no sync) or 1."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        scale = getattr(scaler, "_scale", None)
        return scale.float() if isinstance(scale, torch.Tensor) else float(scaler.get_scale())

    @staticmethod
    def _grads_unscaled(trainer: Trainer, optimizer: Any) -> bool:
        # Lightning's MixedPrecision skips unscale_ for optimizers that unscale in step() (e.g. fused Adam).
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False)

    def _grad_sq(self) -> torch.Tensor:
        """|.grad|² over our parameters as they stand (fused norms; fp32 accumulation, fp64 for fp64 gradients);
        a device scalar, no host read."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=self._norm_dtype)
        return torch.stack(torch._foreach_norm(grads, 2, dtype=self._norm_dtype)).square().sum()

    def _commit(self, sq: torch.Tensor, samples: float, weight: float, slots: tuple[str, ...] = _POINT_SLOTS) -> None:
        """Add the point (x = 1/B, y = |G_B|²) with ``weight`` to the step's least-squares sums."""
        assert self.ledger is not None
        x = 1.0 / samples
        n_slot, x_slot, xx_slot, y_slot, xy_slot = slots
        self.ledger.add_to_step(n_slot, weight)
        self.ledger.add_to_step(x_slot, weight * x)
        self.ledger.add_to_step(xx_slot, weight * x * x)
        self.ledger.add_to_step(y_slot, sq * weight)
        self.ledger.add_to_step(xy_slot, sq * (weight * x))

    def _update(self, trainer: Trainer, grad_sq: float, trace_cov: float) -> None:
        if not (math.isfinite(grad_sq) and math.isfinite(trace_cov)):
            self.skipped_nonfinite += 1
            self._warn.warn(
                "nonfinite",
                f"step {trainer.global_step}: the gradients are not finite (inf or NaN); "
                "such steps are left out of the noise scale and counted in the report.",
            )
            return
        self.estimator.update_estimates(grad_sq, trace_cov)
        if self.estimator.count % self.min_measurements == 0:
            self._history = [*self._history[-(_HISTORY_POINTS - 1) :], (self.estimator.count, self.estimator.b_simple)]
        self._check_batch(trainer)

    def _check_batch(self, trainer: Trainer) -> None:
        if trainer.global_step < self.warmup_steps or self.estimator.count < self.min_measurements:
            return
        b_simple = self.estimator.b_simple
        if not (math.isfinite(b_simple) and b_simple > 0 and self.batch_size > 0):
            return
        ratio = self.batch_size / b_simple
        back_from_high = self.zone == "high" and ratio < self.high_ratio / self.hysteresis
        back_from_low = self.zone == "low" and ratio > self.low_ratio * self.hysteresis
        if back_from_high or back_from_low:
            self.zone = "ok"
        if self.zone != "high" and ratio > self.high_ratio:
            self.zone = "high"
            self._warn_direction("high", ratio, b_simple)
        elif self.zone != "low" and ratio < self.low_ratio:
            self.zone = "low"
            self._warn_direction("low", ratio, b_simple)

    def _warn_direction(self, direction: str, ratio: float, b_simple: float) -> None:
        if direction in self.warned:
            return
        self.warned.add(direction)
        tokens = self.tokens_per_sample
        in_tokens = f" ({b_simple * tokens:,.0f} tokens)" if math.isfinite(tokens) else ""
        where = (
            f"the batch in use ({self.batch_size:,.0f} samples per optimizer step) is {ratio:.1f}x the "
            f"gradient noise scale B_simple ≈ {b_simple:,.0f} samples{in_tokens}"
        )
        caveat = (
            "B_simple approximates the critical batch size (to within about an order of magnitude), and "
            "Adam tends to raise the critical batch size above it."
        )
        if direction == "high":
            message = (
                f"{where}. Above the critical batch size extra examples buy few steps: E/E_min = 1 + "
                f"B/B_noise ≈ {1 + ratio:.1f}, i.e. this run spends about {(1 + ratio) / 2:.1f}x the examples "
                "it would at B = B_noise for the same progress. Consider a smaller global batch (fewer "
                f"accumulation steps or devices) if compute is the constraint. {caveat}"
            )
            rising = self._growth(b_simple)
            if rising is not None:
                growth, measurements = rising
                message += (
                    f" B_simple is still rising fast ({growth:.1f}x over the last {measurements} measurements; "
                    "the noise scale grows as the loss falls, and the smoothed figure lags it), so the batch may "
                    "fit later in the run: a BatchSizeSchedule starts small and grows the batch with B_simple."
                )
        else:
            message = (
                f"{where}. Far below the critical batch size, S/S_min = 1 + B_noise/B ≈ {1 + 1 / ratio:.1f}: "
                "a larger batch (more data parallelism or accumulation) would cut the number of optimizer "
                f"steps at the cost of few extra examples, if wall-clock time is the constraint. {caveat}"
            )
        self._warn.warn(f"batch-{direction}", message)

    def _growth(self, b_simple: float) -> tuple[float, int] | None:
        """(how many times B_simple grew, over how many measurements) since the oldest point of the history, when
        it grew at least ``_RISING`` times; None otherwise."""
        if not self._history:
            return None
        count, then = self._history[0]
        measurements = self.estimator.count - count
        if measurements < self.min_measurements or not (then > 0 and math.isfinite(then)):
            return None
        growth = b_simple / then
        return (growth, measurements) if growth >= _RISING else None

    def _kaplan_critical_batch(self, loss: float) -> float | None:
        if not (math.isfinite(loss) and loss > 0):
            return None
        from lightning_scaling.laws.definitions import KaplanLaw

        # Kaplan 2020 §5.1: B_crit(L) ≈ B*/L^(1/α_B) tokens (WebText2 nats/token)
        return float(KaplanLaw().critical_batch_size(loss))
