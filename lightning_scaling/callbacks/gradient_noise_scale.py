"""GradientNoiseScale: the gradient noise scale B_simple (≈ the critical batch size), live, from gradients that
Lightning already computes (McCandlish et al. 2018, arXiv 1812.06162; SPEC.md §5)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from lightning_scaling._validation import fraction, positive_float, positive_int
from lightning_scaling.callbacks._common import (
    TokensFn,
    WarnOnce,
    count_samples,
    count_tokens,
    guarded,
    replaying_training_step,
    training_step_replay,
    unwrap_loss,
)
from lightning_scaling.noise import NoiseScaleEstimate, NoiseScaleEstimator

_PREFIX = "GradientNoiseScale"
# Strategies that shard or hide the per-rank gradient (by class name, so optional packages are not imported).
_NO_LOCAL_GRADIENTS = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy",
                       "SingleDeviceXLAStrategy", "XLAFSDPStrategy")


class GradientNoiseScale(Callback):
    r"""Estimate the gradient noise scale B_simple = tr(Σ)/|G|² while training and compare it with the batch in use.

    B_simple approximates the critical batch size (McCandlish 2018): training at batch B costs
    S = S_min(1 + B_noise/B) optimizer steps and E = E_min(1 + B/B_noise) examples. Far above it, extra examples
    buy few steps; far below it, more data parallelism would cost few extra examples. With Adam the critical
    batch size tends to be larger than B_simple; read the estimate as good to within an order of magnitude.

    Where the two batch sizes come from (no copy of the gradients):

    * gradient accumulation (``accumulate_grad_batches = k > 1``): a hook on each parameter sees every
      micro-batch's gradient before it is summed into ``.grad``; the small batch is a micro-batch (b samples),
      the big one the optimizer step's gradient (k·b samples). Costs one norm per parameter per micro-batch.
    * DDP (``world_size = R > 1``): each rank's local gradient (hooks, before the all-reduce) against the
      all-reduced ``.grad`` (R·b samples); with accumulation too, R·k micro-batches against R·k·b samples. One
      all-reduce of 6 numbers per optimizer step.
    * neither: every ``every_n_steps`` optimizer steps the batch is split in two and the loss of the first half
      is recomputed for one extra gradient (``training_step`` on half the batch, its ``self.log`` calls
      silenced). That costs about a half forward+backward, i.e. ~``1/(2·every_n_steps)`` of training compute
      (2% at the default 25), plus one transient gradient-sized buffer; it advances the RNG (dropout) and
      assumes the loss is a mean over the samples of the batch. ``split_batch=False`` switches this off.

    Correct under AMP (hook-seen gradients carry the loss scale: squared norms are divided by scale²),
    Lightning's division of the loss by ``accumulate_grad_batches`` (a micro-batch gradient is k times what the
    hook sees), gradient clipping (measured in ``on_before_optimizer_step``, after unscaling and before
    clipping), and non-finite steps (skipped and counted). Under FSDP, DeepSpeed and other sharded strategies the
    local gradients are not available: it warns once and steps aside. Manual optimization: steps aside.

    The micro-batch loss must be a mean over its samples (the usual case); batch sizes are in samples (the
    leading dimension of the batch's first tensor), and in tokens where the batch holds token ids (or through
    ``tokens_fn``).

    Logged (``pl_module.log``, per optimizer step):
        ``scaling/gns``: B_simple in samples. ``scaling/gns_tokens``: the same in tokens.
        ``scaling/grad_sq``: smoothed |G|² estimate. ``scaling/grad_trace_cov``: smoothed tr(Σ) estimate
        (per-sample gradient covariance). ``scaling/batch_size``: global samples per optimizer step.
        ``scaling/batch_tokens``: global tokens per optimizer step. ``scaling/kaplan_critical_batch_tokens``:
        Kaplan 2020's B_crit(L) at the current training loss (``loss_key``), for language models only.

    Args:
        ema_decay: decay of the exponential moving averages of |G|² and tr(Σ), per measurement, in (0, 1). The
            averages cover about (1 + d)/(1 − d) measurements (199 at 0.99).
        warmup_steps: optimizer steps before the batch is compared with B_simple (the noise scale is near zero
            early in training), >= 0.
        every_n_steps: cadence of the split-batch fallback, in optimizer steps (only used with neither
            accumulation nor DDP).
        split_batch: allow the split-batch fallback; ``False`` switches the callback off when there is no
            accumulation and no DDP.
        high_ratio: warn once when the batch in use exceeds ``high_ratio`` × B_simple (> 1).
        low_ratio: warn once when the batch in use falls below ``low_ratio`` × B_simple (in (0, 1)).
        hysteresis: a warning direction re-arms only after the ratio comes back inside the band by this
            factor (> 1); each direction still warns at most once per run.
        min_measurements: measurements needed before warning (>= 1).
        tokens_fn: ``tokens_fn(batch)`` -> training tokens in one micro-batch (default: count token ids).
        loss_key: the logged training loss (nats per token) used for Kaplan's critical batch size.
    """

    def __init__(
        self,
        ema_decay: float = 0.99,
        warmup_steps: int = 100,
        every_n_steps: int = 25,
        split_batch: bool = True,
        high_ratio: float = 4.0,
        low_ratio: float = 0.25,
        hysteresis: float = 1.5,
        min_measurements: int = 20,
        tokens_fn: TokensFn | None = None,
        loss_key: str = "train/loss",
    ) -> None:
        self.estimator = NoiseScaleEstimator(fraction("ema_decay", ema_decay, inclusive_high=False))
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= 2**53:
            raise ValueError(f"warmup_steps must be a whole number >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.every_n_steps = positive_int("every_n_steps", every_n_steps)
        if not isinstance(split_batch, bool):
            raise ValueError(f"split_batch must be True or False, got {split_batch!r}")
        self.split_batch = split_batch
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
        if not isinstance(loss_key, str) or not loss_key:
            raise ValueError(f"loss_key must be a non-empty string, got {loss_key!r}")
        self.loss_key = loss_key

        self.enabled = True
        self._warn = WarnOnce(_PREFIX)
        # persistent state (state_dict)
        self.skipped_nonfinite = 0  # optimizer steps whose gradients were not finite
        self.zone = "ok"  # "ok", "high" or "low": where the batch sits relative to B_simple (with hysteresis)
        self.warned: set[str] = set()
        # last measured step (for logs and the end-of-fit report)
        self.batch_size: float = math.nan  # global samples per optimizer step
        self.batch_tokens: float = math.nan  # global tokens per optimizer step (NaN when unknown)
        # run-time bookkeeping
        self.mode = "off"  # "hooks", "split" or "off"
        self._k = 1  # accumulate_grad_batches the mode was chosen for
        self._world = 1
        self._handles: list[Any] = []
        self._params: list[torch.nn.Parameter] = []
        self._norms: list[torch.Tensor] = []
        self._hook_error: BaseException | None = None
        self._collecting = False
        self._reset_window()
        self._log_pending = False

    # ----------------------------------------------------------------------------------------------------------
    # public
    def estimate(self) -> NoiseScaleEstimate:
        """Current B_simple and its standard error, in samples (NaN before there is one)."""
        return self.estimator.estimate()

    @property
    def tokens_per_sample(self) -> float:
        return self.batch_tokens / self.batch_size if self.batch_size > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        """The numbers for the end-of-fit report (B_simple in samples and tokens, the batch in use)."""
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
        }

    # ----------------------------------------------------------------------------------------------------------
    # hooks, in the order Lightning runs them
    @guarded
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        if names & set(_NO_LOCAL_GRADIENTS) or not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            self._step_aside(f"{type(trainer.strategy).__name__} does not expose each rank's local gradient "
                             "(sharded or compiled gradients), so the noise scale cannot be measured; stepping aside.")
            return
        if not pl_module.automatic_optimization:
            self._step_aside("manual optimization is not supported (Lightning's accumulation and clipping hooks "
                             "are not in charge); stepping aside.")

    @guarded
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        self._configure(trainer, pl_module)

    @guarded
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset_window()

    @guarded
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if int(trainer.accumulate_grad_batches) != self._k:  # a GradientAccumulationScheduler changed it
            self._reset_window()
            self._configure(trainer, pl_module)
        if self.mode == "off":
            return
        samples = count_samples(batch)
        if samples == 0:  # an empty batch: nothing to measure in this micro-batch
            self._pending = None
            self._collecting = False
            return
        if samples is None:
            self._step_aside("cannot count the samples in a batch (no tensor with a leading batch dimension); "
                             "stepping aside.")
            return
        self._pending = (samples, count_tokens(batch, self.tokens_fn))
        if self.mode == "split":
            self._batch, self._batch_idx = batch, batch_idx  # a reference only, dropped after the step
        self._collecting = True

    @guarded
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # once per backward, i.e. per micro-batch
        if self._hook_error is not None:
            raise self._hook_error
        if self._pending is None:
            return
        samples, tokens = self._pending
        self._pending = None
        self._micro += 1
        self._samples += samples
        self._inv_samples += 1.0 / samples
        self._tokens = None if tokens is None or self._tokens is None else self._tokens + tokens
        if self.mode == "hooks" and self._norms:
            # one small kernel per micro-batch; the squared norms stay on the device (no host sync)
            self._acc += torch.stack(self._norms).square().sum()
            self._norms = []

    @guarded
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Lightning calls this after AMP's unscale_ and before gradient clipping (Precision._after_closure).
        try:
            if self.mode == "hooks":
                self._measure_hooks(trainer, optimizer)
            elif self.mode == "split" and self._micro > 0:
                self.batch_size = float(self._samples)
                self.batch_tokens = math.nan if self._tokens is None else float(self._tokens)
                self._log_pending = True
                if trainer.global_step % self.every_n_steps == 0:
                    self._measure_split(trainer, pl_module, optimizer)
        finally:
            self._reset_window()

    @guarded
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._log_pending:
            return
        self._log_pending = False
        est = self.estimator
        metrics: dict[str, float] = {"scaling/batch_size": self.batch_size}
        if math.isfinite(self.batch_tokens):
            metrics["scaling/batch_tokens"] = self.batch_tokens
        if est.count:
            metrics["scaling/grad_sq"] = est.grad_sq
            metrics["scaling/grad_trace_cov"] = est.trace_cov
            b_simple = est.b_simple
            if math.isfinite(b_simple) and b_simple > 0:
                metrics["scaling/gns"] = b_simple
                if math.isfinite(self.tokens_per_sample):
                    metrics["scaling/gns_tokens"] = b_simple * self.tokens_per_sample
        if math.isfinite(self.batch_tokens):
            kaplan = self._kaplan_critical_batch(trainer, outputs)
            if kaplan is not None:
                metrics["scaling/kaplan_critical_batch_tokens"] = kaplan
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=max(1, int(self.batch_size)))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()  # not guarded: the hooks must go even when the callback switched itself off

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._batch = None

    # ----------------------------------------------------------------------------------------------------------
    # state
    def state_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator.state_dict(),
            "skipped_nonfinite": self.skipped_nonfinite,
            "zone": self.zone,
            "warned": sorted(self.warned),
            "batch_size": self.batch_size,
            "batch_tokens": self.batch_tokens,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.estimator.load_state_dict(state_dict["estimator"])
        self.skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))
        self.zone = str(state_dict.get("zone", "ok"))
        self.warned = set(state_dict.get("warned", ()))
        self._warn.seen.update(self.warned)
        self.batch_size = float(state_dict.get("batch_size", math.nan))
        self.batch_tokens = float(state_dict.get("batch_tokens", math.nan))

    # ----------------------------------------------------------------------------------------------------------
    # internals
    def _reset_window(self) -> None:
        self._pending: tuple[int, int | None] | None = None
        self._micro = 0
        self._samples = 0
        self._inv_samples = 0.0
        self._tokens: int | None = 0
        self._norms = []
        self._collecting = False
        self._batch: Any = None
        self._batch_idx = 0
        if getattr(self, "_acc", None) is not None:
            self._acc.zero_()

    def _configure(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Pick where the two batch sizes come from, for the current accumulation and world size."""
        self._k = int(trainer.accumulate_grad_batches)
        self._world = int(trainer.world_size)
        self._remove_hooks()
        if self._k > 1 or self._world > 1:
            self.mode = "hooks"
            self._acc = torch.zeros((), dtype=torch.float32, device=pl_module.device)
            self._handles = [p.register_hook(self._make_hook()) for p in self._params]
        elif self.split_batch:
            self.mode = "split"
        else:
            self.mode = "off"
            self._warn.info("off", "no gradient accumulation, no DDP and split_batch=False: the gradient noise "
                            "scale is not measured.")

    def _step_aside(self, message: str) -> None:
        self._warn.warn("step-aside", message)
        self.enabled = False
        self.mode = "off"
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            with contextlib.suppress(Exception):
                handle.remove()
        self._handles = []

    def _make_hook(self) -> Any:
        def hook(grad: torch.Tensor) -> None:
            # Sees one micro-batch's gradient of this parameter (times loss scale / k) before it joins .grad.
            if not (self.enabled and self._collecting) or replaying_training_step():
                return None  # off, between micro-batches, or another callback's re-run (FlopCounter's pass)
            try:
                self._norms.append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))
            except Exception as err:  # noqa: BLE001 - never break the user's backward; reported next hook
                self._hook_error = err
                self._collecting = False
            return None

        return hook

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

    def _grad_sq(self, scale: torch.Tensor | float) -> torch.Tensor:
        """|.grad|² over our parameters (fp32 accumulation), divided by ``scale``²."""
        grads = [p.grad for p in self._params if p.grad is not None]
        sq = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
        return sq / (scale * scale)

    def _measure_hooks(self, trainer: Trainer, optimizer: Any) -> None:
        if self._micro == 0 and self._world <= 1:
            return  # under DDP every rank must still take part in the all-reduce below
        scale = self._loss_scale(trainer)
        # hooks saw (micro-batch gradient) × scale / k: undo both (SPEC §5)
        small = self._acc * (self._k * self._k) / (scale * scale)
        # .grad = Σ_i g_i / k over the m micro-batches of this window: (k/m)·.grad is their mean
        big = self._grad_sq(1.0 if self._grads_unscaled(trainer, optimizer) else scale) * (self._k / self._micro) ** 2
        tokens = -1.0 if self._tokens is None else float(self._tokens)
        dtype = torch.float32 if small.device.type == "mps" else torch.float64
        failed = float(getattr(self, "_local_failure", None) is not None)  # an error on one rank stops all (_common.guarded)
        counts = torch.tensor([self._micro, self._inv_samples, self._samples, tokens, failed], dtype=dtype)
        # big is the same on every rank: it rides along in the sum and is divided by the world size below
        local = torch.cat([torch.stack([small, big]).to(dtype), counts.to(small.device, non_blocking=True)])
        world = 1
        if self._world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.SUM)  # gloo has no AVG
            world = torch.distributed.get_world_size()
        sq_small_sum, sq_big, n_micro, inv_sum, samples, tokens, failed = local.tolist()  # one host sync per step
        if failed > 0:
            self._step_aside(f"switched off on every rank after an error on {int(failed)} rank(s).")
            return
        sq_big /= world
        self.batch_size = samples
        self.batch_tokens = tokens if tokens >= 0 and self._tokens is not None else math.nan
        self._log_pending = True
        if n_micro < 2:
            return
        self._update(trainer, sq_small_sum / n_micro, sq_big, n_micro / inv_sum, n_micro * n_micro / inv_sum)

    def _measure_split(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        batch, total = self._batch, self._samples
        half = total // 2
        if batch is None or half < 1:
            return
        sub = _slice_batch(batch, half, total)
        with torch.enable_grad(), trainer.precision_plugin.train_step_context(), training_step_replay(pl_module):
            loss = unwrap_loss(pl_module.training_step(sub, self._batch_idx))
        if loss is None:
            return
        scale = self._loss_scale(trainer)
        params = [p for p in self._params if p.grad is not None]
        grads = torch.autograd.grad(loss * scale if isinstance(scale, torch.Tensor) or scale != 1.0 else loss,
                                    params, allow_unused=True)
        pairs = [(g, p.grad) for g, p in zip(grads, params) if g is not None]
        sq_a = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g, _ in pairs]).square().sum()
        dot = torch.stack([torch.dot(g.flatten().float(), f.flatten().float()) for g, f in pairs]).sum()
        del grads, pairs
        unscaled = self._grads_unscaled(trainer, optimizer)
        full_scale = 1.0 if unscaled else scale
        sq_full = self._grad_sq(full_scale)
        sq_a, dot, sq_full = torch.stack([sq_a / (scale * scale), dot / (scale * full_scale), sq_full]).tolist()
        b_a, b_c = float(half), float(total - half)
        # the full gradient is the sample-weighted mean of the halves: g = (b_a g_a + b_c g_c)/B, so
        # |g_c|² = (B²|g|² − 2B·b_a⟨g, g_a⟩ + b_a²|g_a|²)/b_c² without materialising g_c
        sq_c = (total * total * sq_full - 2 * total * b_a * dot + b_a * b_a * sq_a) / (b_c * b_c)
        inv_small = 0.5 * (1 / b_a + 1 / b_c)
        self._update(trainer, 0.5 * (sq_a + sq_c), sq_full, 1.0 / inv_small, float(total))

    def _update(self, trainer: Trainer, sq_small: float, sq_big: float, b_small: float, b_big: float) -> None:
        if not (math.isfinite(sq_small) and math.isfinite(sq_big)):
            self.skipped_nonfinite += 1
            return
        self.estimator.update(sq_small, sq_big, b_small, b_big)
        self._check_batch(trainer)

    def _check_batch(self, trainer: Trainer) -> None:
        if trainer.global_step < self.warmup_steps or self.estimator.count < self.min_measurements:
            return
        b_simple = self.estimator.b_simple
        if not (math.isfinite(b_simple) and b_simple > 0 and self.batch_size > 0):
            return
        ratio = self.batch_size / b_simple
        if self.zone == "high" and ratio < self.high_ratio / self.hysteresis:
            self.zone = "ok"
        elif self.zone == "low" and ratio > self.low_ratio * self.hysteresis:
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
        where = (f"the batch in use ({self.batch_size:,.0f} samples per optimizer step) is {ratio:.1f}x the "
                 f"gradient noise scale B_simple ≈ {b_simple:,.0f} samples{in_tokens}")
        caveat = ("B_simple approximates the critical batch size (to within about an order of magnitude), and "
                  "Adam tends to raise the critical batch size above it.")
        if direction == "high":
            message = (f"{where}. Above the critical batch size extra examples buy few steps: E/E_min = 1 + "
                       f"B/B_noise ≈ {1 + ratio:.1f}, i.e. this run spends about {(1 + ratio) / 2:.1f}x the examples "
                       "it would at B = B_noise for the same progress. Consider a smaller global batch (fewer "
                       f"accumulation steps or devices) if compute is the constraint. {caveat}")
        else:
            message = (f"{where}. Far below the critical batch size, S/S_min = 1 + B_noise/B ≈ {1 + 1 / ratio:.1f}: "
                       "a larger batch (more data parallelism or accumulation) would cut the number of optimizer "
                       f"steps at the cost of few extra examples, if wall-clock time is the constraint. {caveat}")
        self._warn.warn(f"batch-{direction}", message)

    def _kaplan_critical_batch(self, trainer: Trainer, outputs: Any) -> float | None:
        loss = trainer.callback_metrics.get(self.loss_key)
        if loss is None:
            out = unwrap_loss(outputs)  # Lightning hands back the loss divided by accumulate_grad_batches
            loss = None if out is None else out * int(trainer.accumulate_grad_batches)
        if loss is None:
            return None
        value = float(loss)
        if not (math.isfinite(value) and value > 0):
            return None
        try:
            from lightning_scaling.laws import KaplanLaw  # lazy: the callback works without it
        except ImportError:
            return None
        # Kaplan 2020 §5.1: B_crit(L) ≈ B*/L^(1/α_B) tokens (WebText2 nats/token)
        return float(KaplanLaw().critical_batch_size(value))


def _slice_batch(batch: Any, stop: int, total: int) -> Any:
    """The first ``stop`` samples of ``batch`` (tensors whose leading dimension is ``total``; views, no copy)."""
    if isinstance(batch, torch.Tensor):
        return batch[:stop] if batch.dim() > 0 and batch.shape[0] == total else batch
    if isinstance(batch, Mapping):
        return {k: _slice_batch(v, stop, total) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice_batch(v, stop, total) for v in batch))
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return type(batch)(_slice_batch(v, stop, total) for v in batch)
    return batch
