"""Reliability, faults (issue 8): ScalingMonitor never crashes a user's run over its own bookkeeping.

Non-finite losses and gradients, an empty batch, batches we cannot count, a model that fails under the FLOP
counter, logger-less, fast_dev_run, validation-only, predict-only and epoch-bounded runs: each gets at most one
clear warning per kind (and never our "switched off after an error"), no exception, and the counts stay right.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from gpt import GPTLightningModule
from helpers import TINY, target_tokens
from helpers import quick_trainer as _trainer
from helpers import token_rows as _data
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_scaling.callbacks import ScalingMonitor

OURS = re.compile(r"^(FlopCounter|TokenBudget|GradientNoiseScale|DataRepetition|ScalingMonitor)( \([a-z_]+\))?: ")





class Captured:
    """Our warnings (``warnings.warn`` via rank_zero_warn) and info lines (rank_zero_info logging)."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.infos: list[str] = []

    @property
    def all(self) -> list[str]:
        return self.warnings + self.infos

    def matching(self, pattern: str) -> list[str]:
        return [m for m in self.all if re.search(pattern, m)]

    def check(self, allow_internal: bool = False) -> None:
        """No internal error, and no message of ours twice (at most one warning per kind)."""
        internal = [m for m in self.all if "switched off after an error" in m]
        assert allow_internal or not internal, f"our bookkeeping raised: {internal}"
        dupes = {m for m in self.all if self.all.count(m) > 1}
        assert not dupes, f"repeated: {dupes}"


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.INFO)
        self.sink = sink
        self.seen: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if id(record) in self.seen:  # the same record reaching us through a parent logger too
            return
        self.seen.add(id(record))
        message = record.getMessage()
        if OURS.match(message):
            self.sink.append(message)


@contextlib.contextmanager
def captured(allow_internal: bool = False):
    cap = Captured()
    handler = _ListHandler(cap.infos)
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            yield cap
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    cap.warnings = [str(w.message) for w in records if OURS.match(str(w.message))]
    cap.check(allow_internal)


def _scaling_metrics(trainer):
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("scaling/")}


def _assert_no_nan_metrics(trainer):
    for name, value in _scaling_metrics(trainer).items():
        assert not math.isnan(value), f"{name} is NaN"


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not finite (what AMP's GradScaler does), so one bad step does
    not poison the weights and training goes on."""

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            super().step()
        return loss


class NaNOnceGPT(GPTLightningModule):
    """The tiny GPT whose loss (and so every gradient) is NaN on one training batch."""

    def __init__(self, bad_batch_idx: int, **kwargs) -> None:
        super().__init__(TINY, **kwargs)
        self.bad_batch_idx = bad_batch_idx
        self.bad_seen = 0

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        if batch_idx == self.bad_batch_idx:
            self.bad_seen += 1
            loss = loss * float("nan")
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return SkipNonFiniteAdamW(self.parameters(), lr=1e-3)


# ----------------------------------------------------------------------------------------- non-finite steps


def test_nan_loss_and_gradients_on_one_step_with_accumulation(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale={"warmup_steps": 0})
    module = NaNOnceGPT(bad_batch_idx=5)  # step 3's second micro-batch
    with captured() as cap:
        trainer = _trainer(tmp_path, [monitor], steps=6, accumulate_grad_batches=2)
        trainer.fit(module, DataLoader(_data(32), batch_size=2))
    assert trainer.global_step == 6
    # every micro-batch is counted, the bad one included: it was trained on (and skipped by the optimizer)
    assert monitor.tokens.tokens == 6 * 2 * 2 * 16
    assert monitor.flops.optimizer_steps == 6 and monitor.flops.total_flops > 0
    assert monitor.repetition.summary()["tokens"] == 6 * 2 * 2 * 16
    gns = monitor.noise_scale
    assert gns.enabled and gns.mode == "hooks"
    assert gns.skipped_nonfinite == 1  # exactly the one step, not the ones after it
    assert gns.estimator.count == 5
    assert all(math.isfinite(v) for v in (gns.estimator.grad_sq, gns.estimator.trace_cov))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    _assert_no_nan_metrics(trainer)
    report = json.loads((tmp_path / "scaling_report.json").read_text(), parse_constant=_refuse)
    assert report["tokens"]["training_tokens"] == 6 * 2 * 2 * 16
    # a skipped step is counted, and said once (when the first one happens)
    assert len(cap.matching("^ScalingMonitor \\(noise_scale\\): step 3: the gradients are not finite")) == 1


def _refuse(name):
    raise AssertionError(f"report holds {name}")


# --------------------------------------------------------------------------------------------- empty batch


class SkipNonFiniteGPT(GPTLightningModule):
    def configure_optimizers(self):
        return SkipNonFiniteAdamW(self.parameters(), lr=1e-3)


def test_an_empty_batch_counts_as_zero_and_switches_nothing_off(tmp_path):
    full = _data(4, seed=1)
    batches = [full, full, full[:0], full, full, full]  # the third batch has 0 rows
    monitor = ScalingMonitor(tokens_fn=target_tokens, unique_tokens=4096.0, noise_scale={"warmup_steps": 0})
    with captured() as cap:
        trainer = _trainer(tmp_path, [monitor], steps=3, accumulate_grad_batches=2)
        trainer.fit(SkipNonFiniteGPT(TINY), DataLoader(batches, batch_size=None))
    tokens = 5 * 4 * 16
    assert trainer.global_step == 3
    assert monitor.tokens.tokens == tokens
    summary = monitor.repetition.summary()
    assert summary["tokens"] == tokens and summary["samples"] == 5 * 4
    assert summary["epochs"] == pytest.approx(tokens / 4096.0)
    # FLOPs: five full batches counted, the empty one adds nothing; one empty batch must not stop the counting
    per_batch = next(flops for key, (flops, _) in monitor.flops._shapes.exact.items() if key[0][0] == 4)
    assert monitor.flops.total_flops == 5 * per_batch
    assert not cap.matching("FLOP counting pass failed")
    # An empty micro-batch carries no gradient information: it is skipped, not a reason to stop measuring the
    # noise scale for the rest of the run (nor to say its samples "cannot be counted": there are 0).
    gns = monitor.noise_scale
    assert gns.enabled, cap.all
    assert gns.estimator.count >= 1
    assert not cap.matching("cannot count the samples")
    _assert_no_nan_metrics(trainer)


# ------------------------------------------------------------------------------------ batches we cannot count


class Regressor(L.LightningModule):
    """Float features, float targets: no token ids anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _float_data(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))


def test_float_tensor_batches_warn_once_per_callback_and_flops_still_count(tmp_path):
    monitor = ScalingMonitor(noise_scale={"warmup_steps": 0})
    with captured() as cap:
        trainer = _trainer(tmp_path, [monitor], steps=4, accumulate_grad_batches=2)
        trainer.fit(Regressor(), DataLoader(_float_data(64), batch_size=4))
    assert trainer.global_step == 4
    assert len(cap.matching(r"^ScalingMonitor \(tokens\): cannot count the tokens")) == 1
    assert len(cap.matching(r"^ScalingMonitor \(repetition\): cannot count the tokens")) == 1
    assert monitor.tokens.tokens == 0
    # the FLOP counter does not need tokens: 4 steps of (8x16 + 16x1) matmuls on 4 rows, forward and backward
    # (the backward of the first layer has no input gradient to compute)
    forward = 2 * 4 * (8 * 16 + 16 * 1)
    per_step = forward + 2 * forward - 2 * 4 * 8 * 16
    assert monitor.flops.optimizer_steps == 4
    assert monitor.flops.total_flops == 4 * 2 * per_step
    # samples are the leading dimension of the first tensor: the noise scale is measured in samples
    assert monitor.noise_scale.enabled and monitor.noise_scale.estimator.count >= 1
    assert monitor.noise_scale.batch_size == 2 * 4
    _assert_no_nan_metrics(trainer)


class Packed:
    """A user's own batch type: no tensor we can find by walking containers."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids


class PackedGPT(GPTLightningModule):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch.ids, batch_idx)


def _packed_loader():
    return DataLoader(_data(32), batch_size=4, collate_fn=lambda rows: Packed(torch.stack(rows)))


def test_custom_batch_type_warns_once_per_callback_and_trains(tmp_path):
    monitor = ScalingMonitor(noise_scale={"warmup_steps": 0})
    with captured() as cap:
        trainer = _trainer(tmp_path, [monitor], steps=4, accumulate_grad_batches=2)
        trainer.fit(PackedGPT(TINY), _packed_loader())
    assert trainer.global_step == 4
    assert len(cap.matching(r"^ScalingMonitor \(tokens\): cannot count the tokens of a batch of type Packed")) == 1
    assert len(cap.matching(r"^ScalingMonitor \(repetition\): cannot count")) == 1
    assert len(cap.matching(r"^ScalingMonitor \(noise_scale\): cannot count the samples")) == 1
    assert monitor.flops.optimizer_steps == 4 and monitor.flops.total_flops > 0
    _assert_no_nan_metrics(trainer)


def test_custom_batch_type_with_tokens_fn_counts_right(tmp_path):
    monitor = ScalingMonitor(tokens_fn=lambda b: b.ids[:, 1:].numel(), unique_tokens=32 * 16.0,
                             noise_scale=False)
    with captured():
        trainer = _trainer(tmp_path, [monitor], steps=4)
        trainer.fit(PackedGPT(TINY), _packed_loader())
    assert monitor.tokens.tokens == 4 * 4 * 16
    assert monitor.repetition.summary()["epochs"] == pytest.approx(0.5)


def test_tokens_fn_that_raises_warns_once_and_training_continues(tmp_path):
    def broken(batch):
        raise KeyError("input_ids")

    monitor = ScalingMonitor(tokens_fn=broken, noise_scale=False)
    with captured(allow_internal=True) as cap:  # the user's tokens_fn raised, not our code
        trainer = _trainer(tmp_path, [monitor], steps=3)
        trainer.fit(GPTLightningModule(TINY), DataLoader(_data(32), batch_size=4))
    assert trainer.global_step == 3
    assert monitor.flops.optimizer_steps == 3
    assert len(cap.matching("^ScalingMonitor \\(tokens\\): tokens_fn raised KeyError")) == 1
    assert len(cap.matching("^ScalingMonitor \\(repetition\\): cannot count")) == 1


# -------------------------------------------------------------------------------- FLOP counter failures


class NoDispatchGPT(GPTLightningModule):
    """A model that refuses to run under any TorchDispatchMode (as some custom kernels do)."""

    def training_step(self, batch, batch_idx):
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        if _get_current_dispatch_mode_stack():
            raise RuntimeError("custom kernel cannot run under a dispatch mode")
        return super().training_step(batch, batch_idx)


def test_model_that_cannot_run_under_the_counter_trains_with_measure_false(tmp_path):
    # FLOPs are counted inside the real step, so a model that refuses any dispatch mode opts out of measuring
    monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale={"warmup_steps": 0}, flops={"measure": False})
    with captured():
        trainer = _trainer(tmp_path, [monitor], steps=4, accumulate_grad_batches=2)
        trainer.fit(NoDispatchGPT(TINY), DataLoader(_data(32), batch_size=2))
    assert trainer.global_step == 4
    assert monitor.flops.total_flops == 0
    assert "scaling/flops" not in trainer.callback_metrics
    # the analytic count goes on (the shape is known from module.config)
    assert monitor.flops.total_analytic_flops > 0 and "scaling/flops_analytic" in trainer.callback_metrics
    assert monitor.tokens.tokens == 4 * 2 * 2 * 16
    assert monitor.noise_scale.estimator.count == 4
    _assert_no_nan_metrics(trainer)


# ------------------------------------------------------------------------------------ trainer configurations


def test_logger_less_trainer_writes_report_to_default_root_dir(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    with captured():
        trainer = _trainer(tmp_path, [monitor], steps=2, logger=False)
        trainer.fit(GPTLightningModule(TINY), DataLoader(_data(32), batch_size=4))
    report = json.loads((tmp_path / "scaling_report.json").read_text(), parse_constant=_refuse)
    assert report["tokens"]["training_tokens"] == 2 * 4 * 16
    assert float(trainer.callback_metrics["scaling/tokens"]) == 2 * 4 * 16


def test_csv_logger_gets_the_metrics_and_the_report(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    logger = CSVLogger(tmp_path, name="run")
    with captured():
        trainer = _trainer(tmp_path, [monitor], steps=3, logger=logger, log_every_n_steps=1)
        trainer.fit(GPTLightningModule(TINY), DataLoader(_data(32), batch_size=4))
    metrics = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "scaling/tokens" in metrics and "scaling/flops" in metrics
    report = json.loads((tmp_path / "run" / "version_0" / "scaling_report.json").read_text())
    assert report["compute"]["optimizer_steps"] == 3


def test_fast_dev_run_counts_its_one_batch(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    with captured():
        trainer = L.Trainer(callbacks=[monitor], fast_dev_run=True, default_root_dir=tmp_path, accelerator="cpu",
                            devices=1, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(GPTLightningModule(TINY), DataLoader(_data(32), batch_size=4),
                    DataLoader(_data(8), batch_size=4))
    assert trainer.global_step == 1
    assert monitor.tokens.tokens == 4 * 16 and monitor.tokens.optimizer_steps == 1
    assert monitor.flops.optimizer_steps == 1 and monitor.flops.total_flops > 0
    assert monitor.repetition.summary()["tokens"] == 4 * 16


def test_validation_only_run_is_silent_and_counts_nothing(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    with captured() as cap:
        trainer = _trainer(tmp_path, [monitor], limit_val_batches=None)
        trainer.validate(GPTLightningModule(TINY), DataLoader(_data(8), batch_size=4))
    assert cap.all == []
    assert monitor.tokens.tokens == 0 and monitor.flops.total_flops == 0
    assert monitor.repetition.summary()["tokens"] == 0
    assert not (tmp_path / "scaling_report.json").exists()


def test_predict_only_run_is_silent_and_counts_nothing(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    with captured() as cap:
        trainer = _trainer(tmp_path, [monitor])
        out = trainer.predict(GPTLightningModule(TINY), DataLoader(_data(8)[:, :-1], batch_size=4))
    assert len(out) == 2
    assert cap.all == []
    assert monitor.tokens.tokens == 0 and monitor.flops.total_flops == 0


def test_validate_then_fit_with_the_same_monitor(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    module = GPTLightningModule(TINY)
    with captured():
        trainer = _trainer(tmp_path, [monitor], steps=2, limit_val_batches=None)
        trainer.validate(module, DataLoader(_data(8), batch_size=4))
        trainer.fit(module, DataLoader(_data(32), batch_size=4))
    assert monitor.tokens.tokens == 2 * 4 * 16 and monitor.flops.optimizer_steps == 2


def test_epoch_bounded_run_max_steps_minus_one(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    with captured():
        trainer = _trainer(tmp_path, [monitor], steps=-1, max_epochs=1)
        trainer.fit(GPTLightningModule(TINY), DataLoader(_data(32), batch_size=4))
    assert trainer.global_step == 8
    assert monitor.tokens.tokens == 32 * 16
    rep = monitor.repetition.summary()
    assert rep["epochs"] == pytest.approx(1.0) and rep["projected_epochs"] == pytest.approx(1.0)
    assert monitor.tokens.projected_tokens == pytest.approx(32 * 16)
    _assert_no_nan_metrics(trainer)


def test_epoch_ending_mid_accumulation_counts_every_micro_batch(tmp_path):
    # 3 batches, accumulation 2: Lightning steps after batch 1 and again at the end of the epoch (batch 2)
    monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale={"warmup_steps": 0})
    with captured():
        trainer = _trainer(tmp_path, [monitor], steps=-1, max_epochs=1, limit_train_batches=3,
                           accumulate_grad_batches=2)
        trainer.fit(GPTLightningModule(TINY), DataLoader(_data(32), batch_size=4))
    assert trainer.global_step == 2
    assert monitor.tokens.tokens == 3 * 4 * 16
    assert monitor.repetition.summary()["tokens"] == 3 * 4 * 16
    per_batch = next(iter(monitor.flops._shapes.exact.values()))[0]
    assert monitor.flops.total_flops == 3 * per_batch
    _assert_no_nan_metrics(trainer)


def test_pre_batched_loader_epochs_count_rows_not_batches(tmp_path):
    # DataLoader(batch_size=None) over a list of ready-made batches: len(dataset) is the number of BATCHES
    # (8 of 4 rows), so "len(dataset) x tokens per sample" is 4x too small and the epochs 4x too large.
    data = _data(32)
    batches = list(data.split(4))
    monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale=False)
    with captured():
        trainer = _trainer(tmp_path, [monitor], steps=4)
        trainer.fit(GPTLightningModule(TINY), DataLoader(batches, batch_size=None))
    rows_seen, rows_total = 4 * 4, 32
    assert monitor.repetition.summary()["epochs"] == pytest.approx(rows_seen / rows_total, rel=0.05)
