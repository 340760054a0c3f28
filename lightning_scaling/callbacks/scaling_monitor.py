"""ScalingMonitor: every lightning-scaling callback under one configuration, and an end-of-fit report."""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from lightning_scaling import metric_names
from lightning_scaling.callbacks._base import LedgerCallback, publish_metrics
from lightning_scaling.callbacks._common import TokensFn, planned_optimizer_steps
from lightning_scaling.run_report import HISTORY_FROM_METRICS, ReportThresholds, RunHistory

REPORT_FILE = "scaling_report.json"
PICTURE_FILE = "scaling_report.png"
PICTURE_TAG = metric_names.REPORT_PICTURE  # the image's name in TensorBoard and Weights & Biases


class ScalingMonitor(Callback):
    r"""FLOPs and MFU, tokens per parameter, the gradient noise scale and data repetition, in one callback.

    ``Trainer(callbacks=[ScalingMonitor()])`` runs :class:`FlopCounter`, :class:`TokenBudget`,
    :class:`GradientNoiseScale` and :class:`DataRepetition` with one shared configuration and logs all their
    ``scaling/*`` metrics (to every logger, at the trainer's logging interval). At the end of fit, on rank zero,
    it prints a report a person reads in seconds (compute, tokens, batch size, data: each with its numbers and
    units, a one-line verdict and the advice that follows; see :mod:`lightning_scaling.run_report`), writes it
    as JSON (``scaling_report.json``) and draws it (``scaling_report.png``, with the ``plot`` extra:
    ``pip install 'lightning-scaling[plot]'``) beside the logger's files (``trainer.log_dir``, else
    ``default_root_dir``). The picture is also logged to TensorBoard and Weights & Biases when those loggers
    are in use.

    Args:
        tokens_fn: counts the training tokens of one batch; shared by every part.
        law: a :class:`lightning_scaling.laws.ChinchillaLaw` (for example a fitted one) or a preset name
            (``"besiroglu"``, ``"hoffmann"``, ``"muennighoff"``) for the token budget and the report.
        peak_flops: dense peak FLOP/s of one device, overriding the built-in table.
        causal_attention: ``"half"`` or ``"full"`` (see :mod:`lightning_scaling.flops`).
        unique_tokens: unique tokens in the training data, when the dataset cannot say.
        inference_tokens: tokens the model will serve, for the inference-aware comparison.
        flops, tokens, noise_scale, repetition: extra keyword arguments for each part, or ``False`` to leave
            that part out.
        report: write (and print) the end-of-fit report.
        print_report: print the report at the end of fit; ``False`` only writes the files (the text is then in
            :attr:`report_text`, to print when the progress bar is done drawing).
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
        print_report: bool = True,
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
        for name, value in (("report", report), ("print_report", print_report)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.parts: dict[str, LedgerCallback] = {}
        self._metrics: dict[str, float] = {}
        for name, (cls, options, defaults) in shared.items():
            if options is not False:
                part = cls(**{**defaults, **_options(name, options, cls)})
                part.metrics_sink = self._metrics  # one log call for all parts (on_train_batch_end)
                part.configure_through_monitor(type(self).__name__, name, set(defaults))
                self.parts[name] = part
        self.report_enabled = report
        self.print_report = print_report
        self.history = RunHistory()
        self.report: dict[str, Any] | None = None
        self.report_text: str | None = None
        self.report_path: str | None = None
        self.picture_path: str | None = None
        self._train_started: float | None = None
        self.training_seconds: float | None = None
        self._planned_steps: int | None = None

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
        self._train_started = time.perf_counter()
        self.training_seconds = None
        self._planned_steps = planned_optimizer_steps(trainer)

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
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for part in self.parts.values():
            part.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._metrics:  # the parts filled it only if logging is due (StepRecord.log_now)
            self._record_history(trainer)
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
        if self._train_started is not None:
            self.training_seconds = time.perf_counter() - self._train_started

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
            self._write_report(trainer, trainer.log_dir or trainer.default_root_dir)

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

    def summaries(self) -> dict[str, dict[str, Any]]:
        """Every part's ``summary()``, keyed by part name (``{"error": ...}`` for a summary that raised)."""
        out: dict[str, dict[str, Any]] = {}
        for name, part in self.parts.items():
            summary = getattr(part, "summary", None)
            try:
                out[name] = dict(summary()) if callable(summary) else {}
            except Exception as err:  # noqa: BLE001 - a report must not fail the end of a run
                out[name] = {"error": f"{type(err).__name__}: {err}"}
        return out

    def build_report(
        self, report_path: str | None = None, picture_path: str | None = None, picture_note: str | None = None
    ) -> dict[str, Any]:
        """The end-of-fit report (JSON-able; keys and units in :data:`lightning_scaling.run_report.REPORT_KEYS`):
        the parts' summaries grouped as compute, tokens, batch size and data, each with a verdict and advice,
        and the history of the logged values."""
        from lightning_scaling.run_report import build_run_report

        tokens, noise, data = (self.parts.get(name) for name in ("tokens", "noise_scale", "repetition"))
        defaults = ReportThresholds()
        thresholds = ReportThresholds(
            tokens_per_param=getattr(tokens, "tokens_per_param", defaults.tokens_per_param),
            overhead_threshold=getattr(tokens, "overhead_threshold", defaults.overhead_threshold),
            overtrained_factor=getattr(tokens, "overtrained_factor", defaults.overtrained_factor),
            batch_high_ratio=getattr(noise, "high_ratio", defaults.batch_high_ratio),
            batch_low_ratio=getattr(noise, "low_ratio", defaults.batch_low_ratio),
            warn_epochs=getattr(data, "warn_epochs", defaults.warn_epochs),
            stop_epochs=getattr(data, "stop_epochs", defaults.stop_epochs),
        )
        return build_run_report(
            self.summaries(),
            self.history.columns(),
            law=getattr(tokens, "law", None),
            data_law=getattr(data, "law", None),
            thresholds=thresholds,
            training_seconds=self.training_seconds,
            planned_steps=self._planned_steps,
            report_path=report_path,
            picture_path=picture_path,
            picture_note=picture_note,
        )

    def _record_history(self, trainer: Trainer) -> None:
        """The values behind the picture, at a logging step (a few dict lookups: no device read)."""
        values: dict[str, Any] = {column: self._metrics.get(metric) for metric, column in HISTORY_FROM_METRICS.items()}
        for name in ("tokens", "noise_scale"):  # the step's mean training loss, read back by the ledger
            loss = getattr(self.parts.get(name), "last_loss", math.nan)
            if isinstance(loss, float) and math.isfinite(loss):
                values["training_loss"] = loss
                break
        self.history.add(int(trainer.global_step), values)

    @rank_zero_only
    def _write_report(self, trainer: Trainer, directory: str) -> None:
        from lightning_scaling.run_report import draw_run_report, format_run_report, matplotlib_missing, save_picture

        report_path = os.path.join(directory, REPORT_FILE)
        self.report_path = self.picture_path = None
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as err:
            rank_zero_info(f"{type(self).__name__}: could not create {directory} for the report: {err}")
        report = self.report if self.report is not None else self.build_report()
        pixels = None
        note = matplotlib_missing()
        if note is None:
            try:
                figure = draw_run_report(report)
                pixels = save_picture(figure, os.path.join(directory, PICTURE_FILE))
                self.picture_path = os.path.join(directory, PICTURE_FILE)
            except Exception as err:  # noqa: BLE001 - the picture must not fail the end of a run
                note = f"not drawn: {type(err).__name__}: {err}"
        # the report built in on_fit_end, with where its files went (the picture does not draw them)
        report["files"] = {"report": report_path, "picture": self.picture_path, "picture_note": note}
        try:
            with open(report_path, "w") as fh:
                json.dump(report, fh, indent=2, allow_nan=False)
            self.report_path = report_path
        except (OSError, ValueError) as err:
            report["files"]["report"] = None
            rank_zero_info(f"{type(self).__name__}: could not write {REPORT_FILE} to {directory}: {err}")
        self.report = report
        self.report_text = format_run_report(report)
        if self.print_report:
            rank_zero_info(self.report_text)
        if pixels is not None and self.picture_path is not None:
            self._log_picture(trainer, pixels, self.picture_path)

    def _log_picture(self, trainer: Trainer, pixels: Any, path: str) -> None:
        """The picture to TensorBoard (``add_image``) and Weights & Biases (``log_image``) loggers in use."""
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = int(trainer.global_step)
        for logger in trainer.loggers:
            try:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(PICTURE_TAG, pixels, step, dataformats="HWC")
                elif isinstance(logger, WandbLogger):
                    logger.log_image(key=PICTURE_TAG, images=[path], step=step)
            except Exception as err:  # noqa: BLE001 - a logger's trouble must not fail the end of a run
                rank_zero_info(
                    f"{type(self).__name__}: could not log the report's picture to "
                    f"{type(logger).__name__}: {type(err).__name__}: {err}"
                )


def _options(name: str, value: dict[str, Any] | bool, cls: type) -> dict[str, Any]:
    """The keyword arguments for one part, checked against its constructor."""
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be True, False or a dict of keyword arguments, got {value!r}")
    allowed = list(inspect.signature(cls).parameters)  # the constructor's, without self
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(
            f"{name} has no option {', '.join(map(repr, unknown))}; {cls.__name__} takes {', '.join(allowed)}"
        )
    return value
