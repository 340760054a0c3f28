"""FlopCounter: training FLOPs per step and in total, FLOP/s and MFU, measured from the model itself."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import Any, Iterator

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_scaling.callbacks._common import (
    OptimizerSteps,
    WarnOnce,
    _first_tensor,
    global_sum,
    guarded,
    shape_signature,
    training_step_replay,
    unwrap_loss,
)
from lightning_scaling.callbacks._model_shape import ModelShape, find_model_shape

_MAX_SIGNATURES = 64
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


class FlopCounter(Callback):
    r"""Count the training FLOPs of a ``LightningModule`` from the model itself.

    The first batch of each input shape (batch size, sequence length, ...) is run once more, forward, loss and
    backward, under :func:`lightning_scaling.flop_counting.training_flop_counter` (torch's ``FlopCounterMode``
    with our corrections: CPU attention counted, causal attention halved, our Triton kernels' formulas). The
    count is cached by shape, so every later step costs a dictionary lookup. The extra pass restores the
    gradients, buffers and random state it touched; it does not step the optimizer.

    Logged on each optimizer step (summed over data-parallel ranks and accumulation micro-batches):

    - ``scaling/flops``: cumulative model FLOPs of the run (all ranks)
    - ``scaling/flops_per_step``: model FLOPs of the last optimizer step (all ranks)
    - ``scaling/flops_per_sec``: model FLOP/s over a sliding window of steps (all ranks)
    - ``scaling/mfu``: model FLOPs utilisation against the dense peak of the devices (when known)
    - ``scaling/hardware_flops``: cumulative FLOPs including activation-checkpointing recomputation, when it differs
    - ``scaling/flops_analytic``: cumulative analytic count (Chinchilla App. F) when the model's shape is known

    Args:
        peak_flops: dense peak FLOP/s of ONE device; overrides the table in :mod:`lightning_scaling.hardware`.
            Unknown device and no override: no MFU (one info line), never a guess.
        causal_attention: ``"half"`` (default: a causal kernel computes the lower triangle only) or ``"full"``
            (torch's convention). See :mod:`lightning_scaling.flops`.
        model_shape: the transformer's shape for the analytic count (a :class:`ModelShape`, a mapping or any
            object with config-like attributes). Default: looked up on ``pl_module.config``/``hparams``.
        analytic_tolerance: warn once when measured and analytic counts differ by more than this fraction.
        window: optimizer steps in the FLOP/s window.
    """

    def __init__(
        self,
        peak_flops: float | None = None,
        causal_attention: str = "half",
        model_shape: Any = None,
        analytic_tolerance: float = 0.15,
        window: int = 20,
    ) -> None:
        from lightning_scaling._validation import one_of, positive_float, positive_int
        from lightning_scaling.flops import CAUSAL_ATTENTION_CONVENTIONS

        self.peak_flops_override = None if peak_flops is None else positive_float("peak_flops", peak_flops)
        self.causal_attention = one_of("causal_attention", causal_attention, CAUSAL_ATTENTION_CONVENTIONS)
        self.model_shape_arg = None if model_shape is None else find_model_shape(None, model_shape)
        self.analytic_tolerance = positive_float("analytic_tolerance", analytic_tolerance)
        self.window = positive_int("window", window)
        self.enabled = True
        self._warn = WarnOnce("FlopCounter")
        # cache: batch signature -> (model FLOPs, hardware FLOPs) of one micro-batch on this rank
        self._cache: dict[tuple, tuple[int, int]] = {}
        self._cache_tokens: dict[int, tuple[int, int]] = {}  # token count of a measured shape -> its FLOPs
        self._counting_failed = False
        self._sharded = False
        self._estimating = False
        self._shape: ModelShape | None = None
        self._peak_total: float | None = None
        # checkpointed counters (global over ranks)
        self.total_flops = 0
        self.total_hardware_flops = 0
        self.total_analytic_flops = 0
        self.optimizer_steps = 0
        # per-step scratch (this rank)
        self._step_flops = 0
        self._step_hardware = 0
        self._step_analytic = {"chinchilla": 0, "matmul": 0}
        self._steps = OptimizerSteps()
        self._step_started: float | None = None
        self._measure_seconds = 0.0
        self._times: deque[tuple[int, float]] = deque(maxlen=self.window)
        self.last_flops_per_sec: float | None = None
        self.last_mfu: float | None = None
        self.last_step_flops: int | None = None

    # ----------------------------------------------------------------------------------------------- hooks

    @guarded
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._shape = find_model_shape(pl_module, self.model_shape_arg)
        # Under sharded strategies the counting pass runs collectives (parameter all-gathers), so every rank
        # must run it together: only for the first batch, which all ranks see at once.
        self._sharded = type(trainer.strategy).__name__ in _SHARDED_STRATEGIES
        peak = self.peak_flops_override
        if peak is None:
            from lightning_scaling.hardware import device_peak_flops

            dtype = _compute_dtype(trainer)
            peak = device_peak_flops(trainer.strategy.root_device, dtype)
            if peak is None:
                self._warn.info(
                    "no-peak",
                    f"no dense peak FLOP/s known for {_device_name(trainer)} ({dtype}); MFU is not logged. "
                    "Pass FlopCounter(peak_flops=...) to set it.",
                )
        self._peak_total = None if peak is None else peak * trainer.world_size

    @guarded
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._steps.anchor(trainer)

    @guarded
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._step_started is None:
            self._step_started = time.perf_counter()
        signature = shape_signature(batch)
        cached = self._cache.get(signature)
        if cached is None and not self._counting_failed:
            cached = self._measure(trainer, pl_module, batch, batch_idx)
        if cached is None:
            self._add_analytic(batch)
            return
        if signature not in self._cache:
            self._cache[signature] = cached
            tokens = _first_tensor(batch)
            if tokens is not None and not self._estimating:
                self._cache_tokens.setdefault(max(int(tokens.numel()), 1), cached)
        model_flops, hardware_flops = cached
        self._step_flops += model_flops
        self._step_hardware += hardware_flops
        self._add_analytic(batch)

    @guarded
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._steps.completed(trainer) is None:
            return  # still accumulating: no optimizer step yet
        step_flops, step_hw, step_analytic, step_matmul = global_sum(
            trainer,
            [self._step_flops, self._step_hardware, self._step_analytic["chinchilla"], self._step_analytic["matmul"]],
            owner=self,
        )
        if not self.enabled:
            return
        self._step_flops = self._step_hardware = 0
        self._step_analytic = {"chinchilla": 0, "matmul": 0}
        self.total_flops += step_flops
        self.total_hardware_flops += step_hw
        self.total_analytic_flops += step_analytic
        self.optimizer_steps += 1
        self.last_step_flops = step_flops

        now = time.perf_counter()
        if self._step_started is not None:
            self._times.append((step_flops, max(now - self._step_started - self._measure_seconds, 1e-9)))
        self._step_started = now
        self._measure_seconds = 0.0
        flops_in_window = sum(f for f, _ in self._times)
        seconds_in_window = sum(s for _, s in self._times)
        self.last_flops_per_sec = flops_in_window / seconds_in_window if seconds_in_window > 0 else None

        metrics: dict[str, float] = {}
        if self.total_flops > 0:  # nothing measured (the counting pass failed): only the analytic count
            metrics["scaling/flops"] = float(self.total_flops)
            metrics["scaling/flops_per_step"] = float(step_flops)
            if self.last_flops_per_sec:
                metrics["scaling/flops_per_sec"] = self.last_flops_per_sec
                if self._peak_total:
                    self.last_mfu = self.last_flops_per_sec / self._peak_total
                    metrics["scaling/mfu"] = self.last_mfu
            if self.total_hardware_flops != self.total_flops:
                metrics["scaling/hardware_flops"] = float(self.total_hardware_flops)
        if self._shape is not None:
            metrics["scaling/flops_analytic"] = float(self.total_analytic_flops)
            self._check_against_analytic(step_flops, step_matmul)
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, sync_dist=False)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step_started = None  # validation time is not training time: the next step re-anchors the clock

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._step_started = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "total_flops": self.total_flops,
            "total_hardware_flops": self.total_hardware_flops,
            "total_analytic_flops": self.total_analytic_flops,
            "optimizer_steps": self.optimizer_steps,
            "causal_attention": self.causal_attention,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_flops = int(state_dict.get("total_flops", 0))
        self.total_hardware_flops = int(state_dict.get("total_hardware_flops", self.total_flops))
        self.total_analytic_flops = int(state_dict.get("total_analytic_flops", 0))
        self.optimizer_steps = int(state_dict.get("optimizer_steps", 0))
        saved = state_dict.get("causal_attention", self.causal_attention)
        if saved != self.causal_attention:
            self._warn.warn(
                "convention-changed",
                f"the checkpoint counted causal attention as {saved!r}, this run counts it as "
                f"{self.causal_attention!r}; the cumulative total mixes both conventions.",
            )

    # ------------------------------------------------------------------------------------------- helpers

    def summary(self) -> dict[str, Any]:
        """The numbers for the end-of-fit report (FLOPs, FLOP/s, MFU)."""
        return {
            "flops": self.total_flops,
            "hardware_flops": self.total_hardware_flops,
            "flops_analytic": self.total_analytic_flops if self._shape is not None else None,
            "flops_per_step": self.last_step_flops,
            "flops_per_sec": self.last_flops_per_sec,
            "mfu": self.last_mfu,
            "causal_attention": self.causal_attention,
            "optimizer_steps": self.optimizer_steps,
        }

    def _scaled_from_cache(self, batch: Any) -> tuple[int, int] | None:
        """Estimate a new shape's FLOPs from the measured one with the closest token count, per token."""
        tokens = _first_tensor(batch)
        if tokens is None:
            return None
        self._estimating = True
        self._warn.info(
            "estimate",
            "new batch shapes are now estimated per token from the measured ones: under a sharded strategy a "
            f"counting pass on one rank alone would deadlock the others; otherwise {_MAX_SIGNATURES} shapes "
            "have been measured already (bucket sequence lengths to measure them all).",
        )
        numel = max(int(tokens.numel()), 1)
        (model, hardware), measured = min(
            ((flops, n) for n, flops in self._cache_tokens.items()), key=lambda item: abs(item[1] - numel)
        )
        return int(model * numel / measured), int(hardware * numel / measured)

    def _add_analytic(self, batch: Any) -> None:
        if self._shape is None:
            return
        tokens = _first_tensor(batch)
        if tokens is None or tokens.dim() < 2:
            return
        # The model sees at most config.seq_len tokens (a [B, S + 1] window feeds S inputs).
        seq_len = min(int(tokens.shape[1]), self._shape.seq_len)
        samples = int(tokens.shape[0])
        for key, convention in (("chinchilla", "chinchilla"), ("matmul", "palm")):
            per_sequence = self._shape.training_flops_per_sequence(self.causal_attention, seq_len, convention)
            self._step_analytic[key] += int(samples * per_sequence)

    def _check_against_analytic(self, measured: int, analytic: int) -> None:
        if analytic <= 0 or measured <= 0:
            return
        ratio = measured / analytic
        if abs(ratio - 1) > self.analytic_tolerance:
            self._warn.warn(
                "analytic-mismatch",
                f"measured FLOPs are {ratio:.2f}x the analytic count of the model's matmuls (PaLM App. B, causal "
                f"attention counted as {self.causal_attention!r}). Below 1 usually means a kernel nothing "
                "counted (register its formula with lightning_scaling.flop_counting.register_flop_formula); "
                "above 1, a model shape that does not match the module.",
            )

    def _measure(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> tuple[int, int] | None:
        """One counting pass on this batch: (model FLOPs, hardware FLOPs) of forward + loss + backward."""
        if not pl_module.automatic_optimization:
            self._warn.warn(
                "manual-optimization",
                "manual optimization: the counting pass would step your optimizers, so FLOPs are not measured. "
                "Pass model_shape= to log the analytic count instead.",
            )
            return None
        if self._cache and (self._sharded or len(self._cache) >= _MAX_SIGNATURES):
            return self._scaled_from_cache(batch)
        started = time.perf_counter()
        try:
            forward, backward = _counting_pass(trainer, pl_module, batch, batch_idx, self.causal_attention)
        except Exception as err:  # noqa: BLE001 - a model that fails under the counter must not stop training
            self._warn.warn(
                "count-failed",
                f"the FLOP counting pass failed ({type(err).__name__}: {err}); FLOPs are not measured for this "
                "run. Training continues.",
            )
            self._counting_failed = True
            return None
        finally:
            self._measure_seconds += time.perf_counter() - started
        # Model FLOPs count the backward as at most 2x the forward; anything above that is recomputation
        # (activation checkpointing), which only hardware FLOPs include (PaLM App. B: MFU vs HFU).
        model = forward + min(backward, 2 * forward)
        return int(model), int(forward + backward)


def _counting_pass(
    trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, causal_attention: str
) -> tuple[int, int]:
    """Forward + loss + backward of ``training_step`` under the FLOP counter; returns (forward, backward) FLOPs.

    Leaves no trace: gradients, buffers (e.g. BatchNorm statistics) and RNG state are restored, logging is
    silenced, and the optimizer is not touched.
    """
    from lightning_scaling.flop_counting import training_flop_counter

    params = [p for p in pl_module.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    saved_buffers = {name: buf.detach().clone() for name, buf in pl_module.named_buffers()}
    for p in params:
        p.grad = None
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            stack.enter_context(training_step_replay(pl_module))
            stack.enter_context(_eager_compiled_code())
            stack.enter_context(trainer.precision_plugin.train_step_context())
            counter = stack.enter_context(training_flop_counter(causal_attention=causal_attention))
            loss = unwrap_loss(pl_module.training_step(batch, batch_idx))
            forward = int(counter.get_total_flops())
            if loss is None:
                raise TypeError("training_step returned no loss tensor to differentiate")
            loss.backward()
            total = int(counter.get_total_flops())
    finally:
        for p, grad in zip(params, saved_grads):
            p.grad = grad
        with torch.no_grad():
            for name, buf in pl_module.named_buffers():
                if name in saved_buffers:
                    buf.copy_(saved_buffers[name])
    return forward, total - forward


@contextlib.contextmanager
def _eager_compiled_code() -> Iterator[None]:
    """Run ``torch.compile``d code eagerly so the counter sees every aten op (torch >= 2.6)."""
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


def _compute_dtype(trainer: Trainer) -> str:
    precision = str(getattr(trainer, "precision", "32"))
    if "bf16" in precision:
        return "bf16"
    if "16" in precision:
        return "fp16"
    if "64" in precision:
        return "fp64"
    return "fp32"


def _device_name(trainer: Trainer) -> str:
    device = trainer.strategy.root_device
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return str(device)

