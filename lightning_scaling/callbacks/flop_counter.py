"""FlopCounter: training FLOPs per step and in total, FLOP/s and MFU, measured from the model itself."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils._python_dispatch import TorchDispatchMode
from typing_extensions import override

from lightning_scaling import metric_names
from lightning_scaling.callbacks._base import LedgerCallback, guarded
from lightning_scaling.callbacks._common import first_tensor, shape_signature
from lightning_scaling.callbacks._ledger import StepRecord
from lightning_scaling.flops.counter import TrainingFlopCounter
from lightning_scaling.flops.model_shape import ModelShape, find_model_shape

MODEL = "flops/model"
HARDWARE = "flops/hardware"
ANALYTIC = "flops/analytic"  # Chinchilla App. F convention
ANALYTIC_MATMUL = "flops/analytic_matmul"  # PaLM App. B convention (matmuls only): what the counter sees
UNCOUNTED = "flops/uncounted_micro_batches"  # micro-batches whose FLOPs are unknown (no measurement, no estimate)
MEASURED = "flops/measured_micro_batches"  # micro-batches counted under the FLOP counter (slower steps)


class FlopCounter(LedgerCallback):
    r"""Count the training FLOPs of a ``LightningModule`` from the model itself, inside the real training step.

    The first micro-batch of a new input shape is counted while it really trains: its forward, loss and backward
    run once, as always, under a torch dispatch mode that runs every op as called and asks the formulas of
    :class:`lightning_scaling.flops.counter.TrainingFlopCounter` (torch's table with our corrections: CPU
    attention counted, causal attention under one convention on every attention path, our Triton kernels'
    formulas) what it cost. Nothing of the user's is run twice. A ``torch.compile``d model runs its measured
    micro-batches eagerly (the counter must see each op), so their rounding can differ from the compiled
    steps'; eager models are bit-identical. A few shapes are measured at all
    (``max_measured_shapes``); further shapes of the same batch structure are predicted by the formula
    ``F = p·b + q·b·s + r·b·s²`` fitted to the measured ones (b sequences of length s), trusted only once it has
    predicted a measured shape to 0.2% (:mod:`lightning_scaling.flops.by_shape`). A measured step runs slower
    (the counter intercepts every op); it is left out of the FLOP/s window.

    Logged at the trainer's logging interval (``log_every_n_steps``), totals over data-parallel ranks and
    accumulation micro-batches:

    - ``scaling/flops``: cumulative model FLOPs of the run (all ranks)
    - ``scaling/flops_per_step``: model FLOPs of the last optimizer step (all ranks)
    - ``scaling/flops_per_sec``: model FLOP/s over the last ``window`` optimizer steps (all ranks)
    - ``scaling/mfu``: model FLOPs utilisation against the dense peak of the devices (when known)
    - ``scaling/hardware_flops``: cumulative FLOPs including activation-checkpointing recomputation, when it differs
    - ``scaling/flops_analytic``: cumulative analytic count (Chinchilla App. F) when the model's shape is known

    Args:
        peak_flops: dense peak FLOP/s of ONE device; overrides the table in :mod:`lightning_scaling.flops.hardware`.
            Unknown device and no override: no MFU (one info line), never a guess.
        causal_attention: ``"half"`` (default: a causal kernel computes the lower triangle only) or ``"full"``
            (torch's convention). See :mod:`lightning_scaling.flops`.
        model_shape: the transformer's shape for the analytic count (a :class:`ModelShape`, a mapping or any
            object with config-like attributes). Default: looked up on ``pl_module.config``/``hparams``.
        analytic_tolerance: warn once when measured and analytic counts differ by more than this fraction.
        window: optimizer steps in the FLOP/s window.
        max_measured_shapes: input shapes counted under the FLOP counter at most (each one slows its step).
        measure: ``False`` counts nothing under the FLOP counter (for a model that cannot run under a torch
            dispatch mode); only the analytic count is then logged.
    """

    def __init__(
        self,
        peak_flops: float | None = None,
        causal_attention: str = "half",
        model_shape: Any = None,
        analytic_tolerance: float = 0.15,
        window: int = 20,
        max_measured_shapes: int = 8,
        measure: bool = True,
    ) -> None:
        from lightning_scaling.argument_checks import one_of, positive_float, positive_int
        from lightning_scaling.flops.formulas import CAUSAL_ATTENTION_CONVENTIONS

        super().__init__()
        self.peak_flops_override = None if peak_flops is None else positive_float("peak_flops", peak_flops)
        self.causal_attention = one_of("causal_attention", causal_attention, CAUSAL_ATTENTION_CONVENTIONS)
        self.model_shape_arg = None if model_shape is None else find_model_shape(None, model_shape)
        self.analytic_tolerance = positive_float("analytic_tolerance", analytic_tolerance)
        self.window = positive_int("window", window)
        self.max_measured_shapes = positive_int("max_measured_shapes", max_measured_shapes)
        if not isinstance(measure, bool):
            raise ValueError(f"measure must be True or False, got {measure!r}")
        self.measure = measure
        self._shape: ModelShape | None = None
        self._analytic_per_sequence: dict[int, tuple[float, ...]] = {}  # seq_len -> Chinchilla, PaLM FLOPs
        self._peak_total: float | None = None
        self._shapes: Any = None  # a FlopsByShape, made at fit start
        self._counting_failed = not measure
        self._measuring: _Measurement | None = None
        self._step_had_measurement = False
        # checkpointed counters (global over ranks)
        self.total_flops = 0
        self.total_hardware_flops = 0
        self.total_analytic_flops = 0
        self.optimizer_steps = 0
        # timing (this fit)
        self._step_started: float | None = None
        self._times: deque[tuple[float, float]] = deque(maxlen=self.window)
        self.last_flops_per_sec: float | None = None
        self.last_mfu: float | None = None
        self.last_step_flops: int | None = None
        self.uncounted_micro_batches = 0  # micro-batches (this rank) whose FLOPs are neither measured nor estimated

    # ------------------------------------------------------------------------- hooks, in the order they run
    @override
    def _on_setup_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.ledger is not None
        self.ledger.declare(MODEL, HARDWARE, ANALYTIC, ANALYTIC_MATMUL, UNCOUNTED, MEASURED)

    @override
    @guarded
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_scaling.flops.by_shape import FlopsByShape

        self._shape = find_model_shape(pl_module, self.model_shape_arg)
        self._analytic_per_sequence = {}
        self._shapes = FlopsByShape(max_measured=self.max_measured_shapes)
        if self.measure and _uses_flex_attention(pl_module):
            # torch's eager flex attention refuses to run under any dispatch mode: measuring would break the step
            self._counting_failed = True
            self._warn.info(
                "flex",
                "the model uses flex attention, which cannot run under a FLOP counter; FLOPs are not measured "
                "(the analytic count is logged when the model's shape is known).",
            )
        peak = self.peak_flops_override
        if peak is None:
            from lightning_scaling.flops.hardware import device_peak_flops

            dtype = _compute_dtype(trainer)
            peak = device_peak_flops(trainer.strategy.root_device, dtype)
            if peak is None:
                self._warn.info(
                    "no-peak",
                    f"no dense peak FLOP/s known for {_device_name(trainer)} ({dtype}); MFU is not logged. "
                    f"Pass {self.option_hint('peak_flops')} to set it.",
                )
        self._peak_total = None if peak is None else peak * trainer.world_size

    @override
    def _on_micro_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.ledger is not None
        self._close_stale_measurement()  # a batch skipped by on_train_batch_start returning -1 never ended
        if self._step_started is None:
            self._step_started = time.perf_counter()
        self._add_analytic(batch)
        key, family, b, s = _shape_key(batch)
        counted = self._shapes.lookup(key, family, b, s)
        if counted is None and not self._counting_failed and self._shapes.should_measure():
            self._measuring = _Measurement(key, family, b, s, self.causal_attention)
            self._step_had_measurement = True
            return  # counted while it runs; added in on_after_backward
        if counted is None:
            counted = self._shapes.fallback(key, family, b, s)
            if counted is not None:
                self._warn.info(
                    "estimate",
                    f"{self._shapes.measured} input shapes have been measured; further shapes are estimated from "
                    f"them (raise {self.option_hint('max_measured_shapes')}, or bucket sequence lengths, to measure "
                    "more).",
                )
        if counted is None:
            self.ledger.add(UNCOUNTED, 1)
            self.uncounted_micro_batches += 1
            self._warn.warn(
                "uncounted",
                f"a batch of a new structure arrived after {self._shapes.measured} shapes were measured "
                "(max_measured_shapes); its FLOPs are not counted, so the FLOP totals are low (see "
                f"summary()['uncounted_micro_batches']). Raise {self.option_hint('max_measured_shapes')}.",
            )
            return
        self.ledger.add(MODEL, counted[0])
        self.ledger.add(HARDWARE, counted[1])

    @override
    def _on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._measuring is not None and pl_module.automatic_optimization:
            self._finish_measurement()

    @override
    def _on_micro_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any) -> None:
        if self._measuring is None:
            return
        if pl_module.automatic_optimization:  # no backward ran (training_step returned None): measure it later
            self._measuring.close()
            self._measuring = None
        else:  # manual optimization: the whole training_step, however many backward passes it made
            self._finish_measurement()

    @override
    def _on_step(self, trainer: Trainer, pl_module: LightningModule, record: StepRecord) -> dict[str, float] | None:
        step_flops, step_hw = int(record[MODEL]), int(record[HARDWARE])
        self.total_flops += step_flops
        self.total_hardware_flops += step_hw
        self.total_analytic_flops += int(record[ANALYTIC])
        if record.steps == 0:
            return None
        self.optimizer_steps += record.steps
        self.last_step_flops = step_flops
        now = time.perf_counter()
        if self._step_started is not None and not self._step_had_measurement and record[UNCOUNTED] == 0:
            self._times.append((step_flops, max(now - self._step_started, 1e-9)))
        self._step_started = now
        self._step_had_measurement = False
        seconds = sum(s for _, s in self._times)
        self.last_flops_per_sec = sum(f for f, _ in self._times) / seconds if seconds > 0 else None
        if self.last_flops_per_sec and self._peak_total:
            self.last_mfu = self.last_flops_per_sec / self._peak_total
        if self._shape is not None and record[UNCOUNTED] == 0:
            self._check_against_analytic(step_flops, int(record[ANALYTIC_MATMUL]))
        if not record.log_now:  # the metrics are built only when they are logged
            return None

        metrics: dict[str, float] = {}
        if self.total_flops > 0:  # nothing measured (counting failed or off): only the analytic count
            metrics[metric_names.FLOPS] = float(self.total_flops)
            metrics[metric_names.FLOPS_PER_STEP] = float(step_flops)
            if self.last_flops_per_sec:
                metrics[metric_names.FLOPS_PER_SEC] = self.last_flops_per_sec
                if self.last_mfu is not None and self._peak_total:
                    metrics[metric_names.MFU] = self.last_mfu
            if self.total_hardware_flops != self.total_flops:
                metrics[metric_names.HARDWARE_FLOPS] = float(self.total_hardware_flops)
        if self._shape is not None:
            metrics[metric_names.FLOPS_ANALYTIC] = float(self.total_analytic_flops)
        return metrics

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step_started = None  # validation time is not training time: the next step re-anchors the clock

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._step_started = None
        self._close_stale_measurement()
        super().on_exception(trainer, pl_module, exception)

    @override
    def _on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close_stale_measurement()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close_stale_measurement()  # the dispatch mode must never outlive the fit
        super().teardown(trainer, pl_module, stage)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "total_flops": self.total_flops,
            "total_hardware_flops": self.total_hardware_flops,
            "total_analytic_flops": self.total_analytic_flops,
            "optimizer_steps": self.optimizer_steps,
            "causal_attention": self.causal_attention,
        }

    @override
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
    @property
    def measured_shapes(self) -> int:
        """Input shapes counted under the FLOP counter so far (each slowed its step)."""
        return 0 if self._shapes is None else self._shapes.measured

    @property
    def predicted_shapes(self) -> int:
        """Distinct input shapes whose FLOPs were predicted from the measured shapes."""
        return 0 if self._shapes is None else self._shapes.predicted_shapes

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
            "measured_shapes": self.measured_shapes,
            "uncounted_micro_batches": self.uncounted_micro_batches,
        }

    def _close_stale_measurement(self) -> None:
        if self._measuring is not None:
            self._measuring.close()
            self._measuring = None

    def _finish_measurement(self) -> None:
        assert self._measuring is not None and self.ledger is not None
        measuring, self._measuring = self._measuring, None
        result = measuring.close()
        if result is None:
            self._counting_failed = True
            self._warn.warn(
                "count-failed",
                f"the FLOP counter failed on this model ({measuring.error}); FLOPs are not measured for this run "
                "(the analytic count goes on). Training continues.",
            )
            self.ledger.add(UNCOUNTED, 1)
            return
        model, hardware = result
        attention = measuring.attention_calls
        if attention:
            paths = ", ".join(f"{n} x {path}" for path, n in sorted(attention.items()))
            self._warn.info(
                "attention", f"attention counted as {self.causal_attention!r} causal; layers recognised: {paths}."
            )
        error = self._shapes.record(
            measuring.key,
            measuring.family,
            measuring.batch_size,
            measuring.seq_len,
            model,
            hardware,
            attention=measuring.attention_flops,
        )
        if error is not None and error > self._shapes.tolerance:
            self._warn.info(
                "shape-formula",
                f"FLOPs of a new input shape differ from the formula fitted on the measured shapes by {error:.2%}; "
                "new shapes are measured until a prediction holds.",
            )
        self.ledger.add(MODEL, model)
        self.ledger.add(HARDWARE, hardware)
        self.ledger.add(MEASURED, 1)

    def _add_analytic(self, batch: Any) -> None:
        if self._shape is None:
            return
        assert self.ledger is not None
        tokens = first_tensor(batch)
        if tokens is None or tokens.dim() < 2:
            return
        # The model sees at most config.seq_len tokens (a [B, S + 1] window feeds S inputs).
        seq_len = min(int(tokens.shape[1]), self._shape.seq_len)
        samples = int(tokens.shape[0])
        per_sequence = self._analytic_per_sequence.get(seq_len)
        if per_sequence is None:  # one formula evaluation per sequence length, not per micro-batch
            per_sequence = tuple(
                self._shape.training_flops_per_sequence(self.causal_attention, seq_len, convention)
                for convention in ("chinchilla", "palm")
            )
            self._analytic_per_sequence[seq_len] = per_sequence
        self.ledger.add(ANALYTIC, int(samples * per_sequence[0]))
        self.ledger.add(ANALYTIC_MATMUL, int(samples * per_sequence[1]))

    def _check_against_analytic(self, measured: int, analytic: int) -> None:
        if analytic <= 0 or measured <= 0:
            return
        ratio = measured / analytic
        if abs(ratio - 1) > self.analytic_tolerance:
            self._warn.warn(
                "analytic-mismatch",
                f"measured FLOPs are {ratio:.2f}x the analytic count of the model's matmuls (PaLM App. B, causal "
                f"attention counted as {self.causal_attention!r}). Below 1 usually means a kernel nothing "
                "counted (register its formula with lightning_scaling.flops.counter.register_flop_formula); "
                "above 1, a model shape that does not match the module.",
            )


class _Measurement:
    """The FLOP counter, open around one real micro-batch (entered in ``on_train_batch_start``, closed after its
    backward). ``torch.compile``d code runs eagerly for that micro-batch so that the counter sees every op."""

    def __init__(self, key: Any, family: Any, batch_size: int, seq_len: int, causal_attention: str) -> None:
        self.key, self.family, self.batch_size, self.seq_len = key, family, batch_size, seq_len
        self.error: str | None = None
        self.attention_calls: dict[str, int] = {}
        self.attention_flops: tuple[int, int] | None = None  # (model, hardware) of the attention calls
        self._stack = contextlib.ExitStack()
        self._counter: _InStepCounter | None = _InStepCounter(causal_attention)
        try:
            self._stack.enter_context(_eager_compiled_code())
            self._stack.enter_context(self._counter)
        except Exception as err:  # noqa: BLE001 - could not start counting: this micro-batch is not measured
            self.error = f"{type(err).__name__}: {err}"
            self._stack.close()
            self._counter = None

    def close(self) -> tuple[int, int] | None:
        """Stop counting; (model FLOPs, hardware FLOPs) of the micro-batch, or None if counting failed."""
        counter, self._counter = self._counter, None
        if counter is None:
            return None
        self.attention_calls = counter.attention_calls
        try:
            self._stack.close()
        except Exception as err:  # noqa: BLE001
            self.error = f"{type(err).__name__}: {err}"
            return None
        if counter.error is not None:
            self.error = counter.error
            return None
        by_phase = counter.attention_flops  # (model, hardware) by phase
        (forward, forward_hw), (backward, backward_hw) = by_phase["forward"], by_phase["backward"]
        self.attention_flops = (_model_flops(forward, backward), forward_hw + backward_hw)
        # Hardware FLOPs are what the kernels executed: the full square of a masked attention, recomputed scores.
        return _model_flops(counter.forward_flops, counter.backward_flops), int(counter.hardware_flops)


def _model_flops(forward: int, backward: int) -> int:
    """Model FLOPs of a step: the backward counts as at most 2x the forward; anything above that is recomputation
    (activation checkpointing), which only hardware FLOPs include (PaLM App. B: MFU vs HFU)."""
    return int(forward + min(backward, 2 * forward))


class _InStepCounter(TorchDispatchMode):
    """Counts the FLOPs of the ops the user's real step runs, without changing how they run.

    torch's ``FlopCounterMode`` cannot be used as is inside the real step: its dispatch tries to decompose every
    op it meets (so some ops run as their decomposition, which changes the rounding of the results) and it
    hooks every module. This mode runs each op exactly as called and only asks the formulas of a
    :class:`~lightning_scaling.flops.counter.TrainingFlopCounter` (our corrected attention, our kernels, the
    forward/backward split) how many FLOPs it made. A formula that fails voids the measurement; it never raises
    into the user's code.
    """

    supports_higher_order_operators = True  # flex attention reaches the mode as a higher-order operator

    def __init__(self, causal_attention: str) -> None:
        super().__init__()
        self.counter = TrainingFlopCounter(causal_attention=causal_attention)
        self.error: str | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.error is None:
            # the counter's formulas are keyed by op packet, its attention handlers by a higher-order op itself
            key = func if isinstance(func, torch._ops.HigherOrderOperator) else func._overloadpacket
            try:
                self.counter._count_flops(key, out, args, kwargs)
            except Exception as err:  # noqa: BLE001 - the measurement is void; the user's op ran fine
                self.error = f"counting {func} raised {type(err).__name__}: {err}"
        return out

    @property
    def forward_flops(self) -> int:
        return self.counter.forward_flops

    @property
    def backward_flops(self) -> int:
        return self.counter.backward_flops

    @property
    def hardware_flops(self) -> int:
        return self.counter.hardware_flops

    @property
    def attention_calls(self) -> dict[str, int]:
        return self.counter.attention_calls

    @property
    def attention_flops(self) -> dict[str, tuple[int, int]]:
        return self.counter.attention_flops


def _uses_flex_attention(module: torch.nn.Module) -> bool:
    """Whether a Hugging Face model inside ``module`` is configured for flex attention."""
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if getattr(config, "_attn_implementation", None) == "flex_attention":
            return True
    return False


def _shape_key(batch: Any) -> tuple[Any, Any, int, int]:
    """(exact key, family key, batch size b, sequence length s) of a micro-batch. The family abstracts b and s
    in every tensor's shape, so that batches of the same structure share one fitted formula."""
    key = shape_signature(batch)
    tokens = first_tensor(batch)
    if tokens is None or tokens.dim() == 0:
        return key, key, 1, 1
    b = int(tokens.shape[0])
    s = int(tokens.shape[1]) if tokens.dim() >= 2 else 1
    return key, _abstract(key, b, s), b, s


def _abstract(signature: Any, b: int, s: int) -> Any:
    if (
        isinstance(signature, tuple)
        and len(signature) == 2
        and isinstance(signature[0], tuple)
        and all(isinstance(d, int) for d in signature[0])
        and isinstance(signature[1], str)
    ):
        dims = signature[0]
        named = tuple("b" if i == 0 and d == b else "s" if i > 0 and d == s else d for i, d in enumerate(dims))
        return (named, signature[1])
    if isinstance(signature, tuple):
        return tuple(_abstract(part, b, s) for part in signature)
    return signature


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
