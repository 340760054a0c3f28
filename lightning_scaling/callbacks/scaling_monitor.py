"""ScalingMonitor: every lightning-scaling callback under one configuration, and an end-of-fit report."""

from __future__ import annotations

import inspect
import json
import math
import os
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from lightning_scaling.callbacks._base import LedgerCallback, publish_metrics
from lightning_scaling.callbacks._common import TokensFn

REPORT_FILE = "scaling_report.json"


class ScalingMonitor(Callback):
    r"""FLOPs and MFU, tokens per parameter, the gradient noise scale and data repetition, in one callback.

    ``Trainer(callbacks=[ScalingMonitor()])`` runs :class:`FlopCounter`, :class:`TokenBudget`,
    :class:`GradientNoiseScale` and :class:`DataRepetition` with one shared configuration, logs all their
    ``scaling/*`` metrics (to every logger, at the trainer's logging interval), and at the end of fit prints a report (a table, rank zero) and writes it as JSON
    (``scaling_report.json``) beside the logger's files (``trainer.log_dir``, else ``default_root_dir``).

    Args:
        tokens_fn: counts the training tokens of one batch; shared by every part.
        law: a :class:`lightning_scaling.laws.ChinchillaLaw` (for example a fitted one) for the token budget.
        peak_flops: dense peak FLOP/s of one device, overriding the built-in table.
        causal_attention: ``"half"`` or ``"full"`` (see :mod:`lightning_scaling.flops`).
        unique_tokens: unique tokens in the training data, when the dataset cannot say.
        inference_tokens: tokens the model will serve, for the inference-aware comparison.
        flops, tokens, noise_scale, repetition: extra keyword arguments for each part, or ``False`` to leave
            that part out.
    """

    def __init__(
        self,
        tokens_fn: TokensFn | None = None,
        law: Any = None,
        peak_flops: float | None = None,
        causal_attention: str = "half",
        unique_tokens: float | None = None,
        inference_tokens: float | None = None,
        flops: dict[str, Any] | bool = True,
        tokens: dict[str, Any] | bool = True,
        noise_scale: dict[str, Any] | bool = True,
        repetition: dict[str, Any] | bool = True,
        report: bool = True,
    ) -> None:
        from lightning_scaling.callbacks.data_repetition import DataRepetition
        from lightning_scaling.callbacks.flop_counter import FlopCounter
        from lightning_scaling.callbacks.gradient_noise_scale import GradientNoiseScale
        from lightning_scaling.callbacks.token_budget import TokenBudget

        shared = {
            "flops": (FlopCounter, flops, {"peak_flops": peak_flops, "causal_attention": causal_attention}),
            "tokens": (TokenBudget, tokens, {"tokens_fn": tokens_fn, "law": law, "inference_tokens": inference_tokens}),
            "noise_scale": (GradientNoiseScale, noise_scale, {"tokens_fn": tokens_fn}),
            "repetition": (DataRepetition, repetition, {"tokens_fn": tokens_fn, "unique_tokens": unique_tokens}),
        }
        if not isinstance(report, bool):
            raise ValueError(f"report must be True or False, got {report!r}")
        self.parts: dict[str, LedgerCallback] = {}
        self._metrics: dict[str, float] = {}
        for name, (cls, options, defaults) in shared.items():
            if options is not False:
                part = cls(**{**defaults, **_options(name, options, cls)})
                part.metrics_sink = self._metrics  # one log call for all parts (on_train_batch_end)
                self.parts[name] = part
        self.report_enabled = report
        self.report: dict[str, Any] | None = None
        self.report_path: str | None = None

    def __getattr__(self, name: str) -> Any:
        # Reaching a part: monitor.flops, monitor.tokens, monitor.noise_scale, monitor.repetition.
        parts = self.__dict__.get("parts", {})
        if name in parts:
            return parts[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    # ------------------------------------------------------------------------- hooks, in the order they run
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for part in self.parts.values():
            part.setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for part in self.parts.values():
            part.on_fit_start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for part in self.parts.values():
            part.on_train_start(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for part in self.parts.values():
            part.on_train_epoch_start(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        for part in self.parts.values():
            part.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for part in self.parts.values():
            part.on_after_backward(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        for part in self.parts.values():
            part.on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for part in self.parts.values():
            part.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._metrics:  # the parts filled it only if logging is due (StepRecord.log_now)
            publish_metrics(trainer, dict(self._metrics))
            self._metrics.clear()

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for part in self.parts.values():
            part.on_validation_end(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for part in self.parts.values():
            part.on_train_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        for part in self.parts.values():
            part.on_exception(trainer, pl_module, exception)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for part in self.parts.values():
            part.on_fit_end(trainer, pl_module)
        if self.report_enabled:
            self.report = self.build_report()
            # trainer.log_dir broadcasts from rank zero: every rank must ask for it.
            self._write_report(trainer.log_dir or trainer.default_root_dir)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for part in self.parts.values():
            part.teardown(trainer, pl_module, stage)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            if name in state_dict:
                part.load_state_dict(state_dict[name])

    def build_report(self) -> dict[str, Any]:
        """Every part's ``summary()``, keyed by part name (JSON-able; NaN and inf become None)."""
        out: dict[str, Any] = {}
        for name, part in self.parts.items():
            summary = getattr(part, "summary", None)
            try:
                out[name] = _jsonable(summary()) if callable(summary) else {}
            except Exception as err:  # noqa: BLE001 - a report must not fail the end of a run
                out[name] = {"error": f"{type(err).__name__}: {err}"}
        return out

    @rank_zero_only
    def _write_report(self, directory: str) -> None:
        report = self.report or {}
        lines = ["lightning-scaling report"]
        for part, values in report.items():
            for key, value in values.items():
                if value is not None:
                    lines.append(f"  {part + '/' + key:<44} {_format(value)}")
        rank_zero_info("\n".join(lines))
        try:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, REPORT_FILE)
            with open(path, "w") as fh:
                json.dump(report, fh, indent=2)
            self.report_path = path
        except OSError as err:
            rank_zero_info(f"ScalingMonitor: could not write {REPORT_FILE} to {directory}: {err}")


def _options(name: str, value: dict[str, Any] | bool, cls: type) -> dict[str, Any]:
    """The keyword arguments for one part, checked against its constructor."""
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be True, False or a dict of keyword arguments, got {value!r}")
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(map(repr, unknown))}; {cls.__name__} takes {', '.join(allowed)}")
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):
        return _jsonable(value.item())
    return value


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**6:
        return f"{value:.4g}"
    return str(value)
