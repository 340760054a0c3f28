"""GradientNoiseScale on the closed-form problem (McCandlish et al. 2018, App. A) under accumulation, DDP, a
scaled loss, bf16 autocast, AMP loss scaling, clipping and a NaN step; plus logs, warnings, state, stepping aside,
float64 training and its constructor arguments."""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from gpt import GPTLightningModule
from helpers import (
    FUZZ,
    TINY,
    TRUE_B_SIMPLE,
    ClosedFormRegression,
    assert_every_constructor_argument_listed,
    assert_rejected_by_name,
    assert_rejected_by_name_or_stored_finite,
    quick_trainer,
    regression_data,
    target_tokens,
    weird_numbers,
)
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from lightning_scaling.callbacks import ScalingMonitor
from lightning_scaling.callbacks.gradient_noise_scale import GradientNoiseScale
from lightning_scaling.estimators.noise_scale import NoiseScaleEstimator


# ---------------------------------------------------------------------------------------------------------------
# the closed-form problem (tests/helpers.py), with a scaled loss, a deliberate NaN batch and the loss logged
class LinearRegression(ClosedFormRegression):
    def __init__(self, loss_factor: float = 1.0, nan_batch: int | None = None) -> None:
        super().__init__()
        self.loss_factor = loss_factor
        self.nan_batch = nan_batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss_of(batch) * self.loss_factor
        if batch_idx == self.nan_batch:
            loss = loss * float("nan")
        self.log("train/loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # runs after the callbacks' hook: keep the frozen weights finite after the deliberate NaN step
        for p in self.parameters():
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)


class RecordingEstimator(NoiseScaleEstimator):
    """Keeps every step's unbiased (|G|², tr(Σ)) so a test can run a deliberately biased estimator on them."""

    def __init__(self, ema_decay: float) -> None:
        super().__init__(ema_decay)
        self.measurements: list[tuple[float, float]] = []

    def update_estimates(self, grad_sq: float, trace_cov: float) -> None:
        self.measurements.append((grad_sq, trace_cov))
        super().update_estimates(grad_sq, trace_cov)


def trainer(steps: int, accumulate: int = 1, **kwargs: Any) -> L.Trainer:
    opts = dict(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    opts.update(kwargs)
    return L.Trainer(**opts)


def run_linear(
    steps: int,
    accumulate: int,
    micro: int,
    module: LinearRegression | None = None,
    cb_kwargs: dict | None = None,
    **trainer_kwargs: Any,
) -> tuple[GradientNoiseScale, L.Trainer]:
    cb = GradientNoiseScale(**{"ema_decay": 0.98, "warmup_steps": 10**9, **(cb_kwargs or {})})
    cb.estimator = RecordingEstimator(cb.estimator.ema_decay)
    t = trainer(steps, accumulate, callbacks=[cb], **trainer_kwargs)
    t.fit(module or LinearRegression(), regression_data(steps * accumulate * micro, micro))
    return cb, t


def assert_on_truth(cb: GradientNoiseScale, measurements: int) -> None:
    e = cb.estimate()
    assert e.measurements == measurements
    assert 0 < e.stderr < 0.25 * TRUE_B_SIMPLE, e  # a tolerance that means something
    assert abs(e.b_simple - TRUE_B_SIMPLE) < 4 * e.stderr, e


# ---------------------------------------------------------------------------------------------------------------
# the estimate against the truth
def test_accumulation_8_matches_truth_and_biased_estimator_misses() -> None:
    cb, t = run_linear(steps=150, accumulate=8, micro=4)
    assert_on_truth(cb, 150)
    m = cb.estimator.measurements
    assert len(m) == 150
    # deliberately biased: the mean of per-step ratios tr(Σ)_t/|G|²_t on the same measurements
    ratios = [tr / g for g, tr in m]
    biased = sum(ratios) / len(ratios)
    assert abs(biased - TRUE_B_SIMPLE) > 4 * cb.estimate().stderr
    # logs
    metrics = t.callback_metrics
    assert float(metrics["scaling/gns"]) == pytest.approx(cb.estimate().b_simple)
    assert float(metrics["scaling/batch_size"]) == 32
    assert float(metrics["scaling/grad_sq"]) == pytest.approx(cb.estimator.grad_sq)
    assert float(metrics["scaling/grad_trace_cov"]) == pytest.approx(cb.estimator.trace_cov)
    assert "scaling/gns_tokens" not in metrics  # float inputs are not tokens
    assert cb.skipped_nonfinite == 0


def test_accumulation_2_matches_truth() -> None:
    cb, _ = run_linear(steps=100, accumulate=2, micro=32)
    assert_on_truth(cb, 100)


def test_one_device_without_accumulation_says_what_it_needs_and_never_replays(monkeypatch) -> None:
    from lightning_scaling.callbacks import _common

    said: list[str] = []
    monkeypatch.setattr(_common, "rank_zero_info", said.append)
    calls = []

    class Counting(LinearRegression):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            calls.append(batch_idx)
            return super().training_step(batch, batch_idx)

    cb, t = run_linear(steps=6, accumulate=1, micro=8, module=Counting())
    assert calls == list(range(6))  # training_step ran once per batch
    assert cb.mode == "off" and cb.estimator.count == 0
    assert "accumulate_grad_batches" in cb.summary()["status"]
    assert sum("accumulate_grad_batches" in m for m in said) == 1
    assert not [k for k in t.callback_metrics if k.startswith("scaling/")]


def test_loss_times_1000_matches_truth() -> None:
    cb, _ = run_linear(steps=100, accumulate=4, micro=16, module=LinearRegression(loss_factor=1000.0))
    assert_on_truth(cb, 100)
    assert cb.estimator.grad_sq == pytest.approx(1e6, rel=0.5)  # |G|² = 1000²|δ|²


def test_bf16_autocast_matches_truth() -> None:
    # bf16 autocast is slow on CPU: few, large micro-batches
    cb, _ = run_linear(steps=80, accumulate=2, micro=64, precision="bf16-mixed")
    assert_on_truth(cb, 80)


def test_amp_loss_scale_is_undone() -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    cb, _ = run_linear(steps=80, accumulate=2, micro=64, plugins=[plugin])
    assert scaler.get_scale() == 2.0**12
    assert_on_truth(cb, 80)
    assert cb.estimator.grad_sq == pytest.approx(1.0, rel=0.5)  # |δ|² = 1, not scaled by 2^24


def test_gradient_clipping_is_measured_before_clipping() -> None:
    cb, _ = run_linear(steps=100, accumulate=4, micro=16, gradient_clip_val=1e-3)
    assert_on_truth(cb, 100)
    assert cb.estimator.grad_sq == pytest.approx(1.0, rel=0.5)  # clipped gradients would give ~1e-6


def test_nan_step_is_skipped_and_counted() -> None:
    cb, t = run_linear(steps=100, accumulate=2, micro=32, module=LinearRegression(nan_batch=7))
    assert cb.skipped_nonfinite == 1
    assert cb.enabled
    assert_on_truth(cb, 99)
    assert t.global_step == 100


class DumpingGNS(GradientNoiseScale):
    """Writes each rank's estimate and state to a file (the spawned processes' callbacks do not come back)."""

    def __init__(self, out_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        e = self.estimate()
        record = {"b_simple": e.b_simple, "stderr": e.stderr, "count": e.measurements, "state": self.state_dict()}
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as fh:
            json.dump(record, fh)


@pytest.mark.slow
def test_ddp_two_processes_with_accumulation(tmp_path) -> None:
    # 2 ranks × 2 micro-batches × 16 samples: small = a micro-batch (16), big = the all-reduced step (64)
    steps = 100
    cb = DumpingGNS(str(tmp_path), ema_decay=0.98, warmup_steps=10**9)
    t = trainer(steps, 2, devices=2, strategy="ddp_spawn", callbacks=[cb])
    t.fit(LinearRegression(), regression_data(steps * 2 * 2 * 16, 16))
    assert float(t.callback_metrics["scaling/batch_size"]) == 64  # rank 0's metrics, sent back by ddp_spawn
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["state"] == ranks[1]["state"]  # identical EMA state on every rank
    r0 = ranks[0]
    assert r0["count"] == steps
    assert 0 < r0["stderr"] < 0.25 * TRUE_B_SIMPLE
    assert abs(r0["b_simple"] - TRUE_B_SIMPLE) < 4 * r0["stderr"], r0
    assert float(t.callback_metrics["scaling/gns"]) == pytest.approx(r0["b_simple"])


# ---------------------------------------------------------------------------------------------------------------
# language model: tokens, Kaplan, hooks on a real network
def test_gpt_tokens_kaplan_and_identical_micro_batches() -> None:
    import gpt

    from lightning_scaling.laws.definitions import KaplanLaw

    cfg = TINY
    module = gpt.GPTLightningModule(cfg, lr=0.0, warmup_steps=1, use_kernels=False)
    batch = torch.randint(0, 256, (4, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))
    cb = GradientNoiseScale(warmup_steps=10**9)
    cb.estimator = RecordingEstimator(0.99)
    t = trainer(3, 2, callbacks=[cb])
    # identical micro-batches: each micro-batch's gradient equals the step's gradient
    t.fit(module, DataLoader(batch.repeat(6, 1), batch_size=4, shuffle=False))
    assert len(cb.estimator.measurements) == 3
    for grad_sq, trace_cov in cb.estimator.measurements:
        # every partial sum of the accumulated .grad is the same mean gradient: no spread across batch sizes
        assert grad_sq > 0 and abs(trace_cov) < 1e-4 * grad_sq * 4
    m = t.callback_metrics
    assert float(m["scaling/batch_tokens"]) == 2 * batch.numel()
    assert float(m["scaling/batch_size"]) == 8
    loss = float(m["train/loss"])
    assert float(m["scaling/kaplan_critical_batch_tokens"]) == pytest.approx(
        float(KaplanLaw().critical_batch_size(loss)), rel=1e-3
    )


class GradientCopies(L.Callback):
    """Test-only reference: a copy of the whole ``.grad`` after each backward and before each optimizer step."""

    def __init__(self) -> None:
        self.after_backward: list[torch.Tensor] = []
        self.before_step: list[torch.Tensor] = []

    @staticmethod
    def _flat(module: L.LightningModule) -> torch.Tensor:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]
        return torch.cat([g.reshape(-1).double() for g in grads])

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.after_backward.append(self._flat(pl_module))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.before_step.append(self._flat(pl_module))


class BranchOnOddBatches(L.LightningModule):
    """A model whose ``branch`` layer trains only on odd batches, so its .grad is None after the first micro-batch
    of each accumulation window (float64, so that differences of accumulated .grad are exact to ~1e-15)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(6, 6, dtype=torch.float64)
        self.branch = torch.nn.Linear(6, 6, dtype=torch.float64)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        hidden = torch.tanh(self.trunk(batch))
        if batch_idx % 2 == 1:
            hidden = hidden + self.branch(hidden)
        return hidden.square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _gpt_and_tokens(batches: int, micro: int) -> tuple[L.LightningModule, DataLoader]:
    import gpt

    cfg = TINY
    module = gpt.GPTLightningModule(cfg, lr=1e-3, warmup_steps=1, use_kernels=False).double()
    tokens = torch.randint(0, 256, (batches * micro, cfg.seq_len + 1), generator=torch.Generator().manual_seed(2))
    return module, DataLoader(tokens, batch_size=micro, shuffle=False)


def _branch_and_data(batches: int, micro: int) -> tuple[L.LightningModule, DataLoader]:
    data = torch.randn(batches * micro, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return BranchOnOddBatches(), DataLoader(data, batch_size=micro, shuffle=False)


@pytest.mark.parametrize("model", ["gpt", "branch"])
@pytest.mark.parametrize("held_bytes", [None, 1], ids=["kept-then-one-fused-norm", "normed-in-each-hook"])
def test_accumulation_points_equal_the_micro_batch_gradients(monkeypatch, model, held_bytes) -> None:
    """Each point the hooks and the fused norms give is exact: micro-batch i's squared norm is that of k times the
    change of .grad over its backward (a reference from copies), the step's is |.grad|², and the step's
    (|G|², tr(Σ)) is their least-squares line. Kept gradients with one fused norm (the default), and each
    gradient normed in its hook (every parameter over the cap on kept bytes); a parameter without .grad after
    the window's first micro-batch (the branch model) is kept and counted too."""
    from lightning_scaling.callbacks import gradient_noise_scale as module_under_test

    if held_bytes is not None:
        monkeypatch.setattr(module_under_test, "_HELD_GRADIENT_BYTES", held_bytes)
    k, micro, steps = (3, 4, 4) if model == "gpt" else (2, 5, 4)
    module, loader = (_gpt_and_tokens if model == "gpt" else _branch_and_data)(steps * k, micro)
    cb = GradientNoiseScale(warmup_steps=10**9, norm_layers=False)
    cb.estimator = RecordingEstimator(0.99)
    points: list[tuple[float, int]] = []
    kept: list[int] = []
    commit, norm_held = cb._commit, cb._norm_held

    def record_point(sq: torch.Tensor, samples: float, *args: Any, **kwargs: Any) -> None:
        points.append((float(sq), int(samples)))
        commit(sq, samples, *args, **kwargs)

    def record_kept() -> None:
        kept.append(len(cb._held))
        norm_held()

    monkeypatch.setattr(cb, "_commit", record_point)
    monkeypatch.setattr(cb, "_norm_held", record_kept)
    copies = GradientCopies()
    t = trainer(steps, k, callbacks=[cb, copies])
    t.fit(module, loader)
    parameters = len(list(module.parameters()))
    if held_bytes is None:  # every parameter kept in each later micro-batch, normed in one call after its backward
        assert kept == [parameters] * ((k - 1) * steps)
    else:
        assert set(kept) == {0}
    assert len(points) == (k + 1) * steps and len(cb.estimator.measurements) == steps
    for step, (grad_sq, trace_cov) in enumerate(cb.estimator.measurements):
        sums = copies.after_backward[step * k : (step + 1) * k]
        before = [torch.zeros_like(sums[0]), *sums[:-1]]
        # Lightning divides each micro-batch loss by k: a micro-batch's own gradient is k times its increment
        micro_sq = [float((k * (b - a)).square().sum()) for a, b in zip(before, sums, strict=True)]
        mean_sq = float(copies.before_step[step].square().sum())
        expected = [(sq, micro) for sq in micro_sq] + [(mean_sq, k * micro)]
        for (got, got_samples), (want, want_samples) in zip(
            points[step * (k + 1) : (step + 1) * (k + 1)], expected, strict=True
        ):
            assert got_samples == want_samples
            assert got == pytest.approx(want, rel=1e-10)
        slope, intercept = np.polyfit([1.0 / micro] * k + [1.0 / (k * micro)], [*micro_sq, mean_sq], 1)
        assert grad_sq == pytest.approx(float(intercept), rel=1e-9, abs=1e-12 * mean_sq)
        assert trace_cov == pytest.approx(float(slope), rel=1e-9)


def test_gpt_gns_tokens_is_gns_times_tokens_per_sample() -> None:
    import gpt

    cfg = TINY
    module = gpt.GPTLightningModule(cfg, lr=0.0, warmup_steps=1, use_kernels=False)
    tokens = torch.randint(0, 256, (8 * 2 * 4, cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))
    cb = GradientNoiseScale(ema_decay=0.5, warmup_steps=10**9)
    t = trainer(8, 2, callbacks=[cb])
    t.fit(module, DataLoader(tokens, batch_size=4, shuffle=False))
    m = t.callback_metrics
    if "scaling/gns" in m:  # positive |G|² estimate (the usual case for an untrained model)
        per_sample = float(m["scaling/batch_tokens"]) / float(m["scaling/batch_size"])
        assert float(m["scaling/gns_tokens"]) == pytest.approx(float(m["scaling/gns"]) * per_sample)
    assert cb.estimator.count == 8 and math.isfinite(cb.estimator.trace_cov) and cb.estimator.trace_cov > 0


# ---------------------------------------------------------------------------------------------------------------
# warnings
def _warnings_of(record: list) -> list[str]:
    return [str(w.message) for w in record if "GradientNoiseScale" in str(w.message)]


def test_warns_once_when_batch_far_above_noise_scale() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cb = GradientNoiseScale(ema_decay=0.9, warmup_steps=5, min_measurements=5)
        t = trainer(40, 2, callbacks=[cb])
        t.fit(LinearRegression(), regression_data(40 * 2 * 128, 128))  # B = 256 ≈ 8 × 33
    msgs = _warnings_of(record)
    assert len(msgs) == 1, msgs
    assert "critical batch size" in msgs[0] and "Adam" in msgs[0] and "E/E_min" in msgs[0]
    assert cb.zone == "high" and cb.warned == {"high"}


def test_warns_when_batch_far_below_noise_scale_and_not_during_warmup() -> None:
    def run(warmup: int) -> list[str]:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            cb = GradientNoiseScale(ema_decay=0.9, warmup_steps=warmup, min_measurements=5)
            trainer(40, 2, callbacks=[cb]).fit(LinearRegression(), regression_data(40 * 2 * 8, 8, sigma=10.0))
        return _warnings_of(record)  # B = 16, B_simple = 17 + 16·100 = 1617

    msgs = run(5)
    assert len(msgs) == 1 and "S/S_min" in msgs[0] and "critical batch size" in msgs[0] and "Adam" in msgs[0]
    assert run(1000) == []


def test_hysteresis_and_once_per_direction() -> None:
    cb = GradientNoiseScale(min_measurements=1, warmup_steps=0, high_ratio=4, hysteresis=1.5)
    cb.estimator.update_estimates(1.0, 10.0)  # B_simple = 10
    fake = SimpleNamespace(global_step=100)
    zones = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for batch in (50, 30, 20, 50, 1):  # ratios 5, 3, 2, 5, 0.1
            cb.batch_size = batch
            cb._check_batch(fake)
            zones.append(cb.zone)
    assert zones == ["high", "high", "ok", "high", "low"]
    msgs = _warnings_of(record)
    assert len(msgs) == 2  # one per direction, never twice


@pytest.mark.parametrize("rising", [True, False])
def test_batch_far_above_says_whether_b_simple_is_still_rising(rising) -> None:
    """Early in training B_simple climbs as the loss falls (the example GPT's: 2.5 samples at step 99, 26.8 at step
    299): the warning that the batch is far above it says so when B_simple grew 1.5x or more over its recent
    history, and the history survives a checkpoint."""
    cb = GradientNoiseScale(ema_decay=0.5, min_measurements=5, warmup_steps=10**9)
    cb.batch_size = 1000.0
    fake = SimpleNamespace(global_step=0)
    for i in range(40):  # B_simple = tr(Σ)/|G|²: from 1 to about 7 samples, or 3 throughout
        cb._update(fake, 1.0, 1.05**i if rising else 3.0)
    assert [count for count, _ in cb._history] == [25, 30, 35, 40]
    restored = GradientNoiseScale(ema_decay=0.5, min_measurements=5, warmup_steps=10**9)
    restored.load_state_dict(json.loads(json.dumps(cb.state_dict())))
    assert restored._history == cb._history
    restored.warmup_steps = 0
    restored.batch_size = 1000.0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        restored._update(fake, 1.0, 1.05**40 if rising else 3.0)
    msgs = _warnings_of(record)
    assert len(msgs) == 1 and "E/E_min" in msgs[0]
    assert ("still rising fast" in msgs[0]) == rising
    if rising:
        assert "over the last 16 measurements" in msgs[0] and "BatchSizeSchedule" in msgs[0]


# ---------------------------------------------------------------------------------------------------------------
# state, robustness, validation
def test_state_dict_resume_continues_exactly(tmp_path) -> None:
    loader = regression_data(20 * 2 * 8, 8)  # one epoch = 20 optimizer steps; resume at the epoch boundary
    full = GradientNoiseScale(warmup_steps=10**9)
    trainer(-1, 2, max_epochs=2, callbacks=[full]).fit(LinearRegression(), loader)

    first = GradientNoiseScale(warmup_steps=10**9)
    t1 = trainer(-1, 2, max_epochs=1, callbacks=[first])
    t1.fit(LinearRegression(), loader)
    ckpt = tmp_path / "half.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = GradientNoiseScale(warmup_steps=10**9)
    trainer(-1, 2, max_epochs=2, callbacks=[resumed]).fit(LinearRegression(), loader, ckpt_path=ckpt)

    assert resumed.estimator.count == full.estimator.count == 40
    assert resumed.state_dict()["estimator"]["moments"] == pytest.approx(
        full.state_dict()["estimator"]["moments"], rel=1e-9
    )

    copy = GradientNoiseScale()
    copy.load_state_dict(full.state_dict())
    assert copy.state_dict() == full.state_dict()
    assert copy.estimate() == full.estimate()


def test_tokens_fn_that_raises_warns_once_and_the_samples_are_still_measured() -> None:
    def broken_tokens(batch: Any) -> int:
        raise RuntimeError("boom")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cb = GradientNoiseScale(tokens_fn=broken_tokens)
        t = trainer(5, 2, callbacks=[cb])
        t.fit(LinearRegression(), regression_data(5 * 2 * 8, 8))
    assert t.global_step == 5 and cb.enabled and cb.estimator.count == 5
    assert math.isnan(cb.batch_tokens) and cb.batch_size == 16
    msgs = _warnings_of(record)
    assert len(msgs) == 1 and "tokens_fn raised RuntimeError: boom" in msgs[0]


def test_internal_error_warns_once_and_training_continues(monkeypatch) -> None:
    cb = GradientNoiseScale()

    def broken() -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(cb, "_grad_sq", broken)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = trainer(5, 2, callbacks=[cb])
        t.fit(LinearRegression(), regression_data(5 * 2 * 8, 8))
    assert t.global_step == 5
    assert not cb.enabled and cb._handles == []
    msgs = _warnings_of(record)
    assert len(msgs) == 1 and "switched off" in msgs[0] and "boom" in msgs[0]


def test_switched_off_after_an_error_lets_go_of_its_hooks_and_kept_gradients_at_once(monkeypatch) -> None:
    """The fused norm of the kept gradients fails on the first step's second micro-batch: from then on no hook is
    left on the model and no gradient kept, during the fit (not only at its end), and training goes on."""
    cb = GradientNoiseScale()

    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(cb, "_norm_held", broken)
    seen: list[tuple[bool, int, int]] = []

    class Probe(L.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            seen.append((cb.enabled, len(cb._handles), len(cb._held)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(4, 2, callbacks=[cb, Probe()])
        t.fit(LinearRegression(), regression_data(4 * 2 * 8, 8))
    assert t.global_step == 4
    assert seen[0][:2] == (True, len(cb._params)) and seen[0][1] > 0  # hooks on while it measured
    assert seen[1:] == [(False, 0, 0)] * 7


class _FakeTrainer:
    world_size = 1
    global_step = 0

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy


def test_sharded_strategy_steps_aside() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    cb = GradientNoiseScale()
    fake = _FakeTrainer(FSDPStrategy())
    with pytest.warns(UserWarning, match="FSDPStrategy"):
        cb.setup(fake, LinearRegression(), "fit")
    assert not cb.enabled and cb.mode == "off"
    cb.on_train_start(fake, LinearRegression())  # guarded hooks are no-ops now
    assert cb._handles == []


def test_manual_optimization_steps_aside() -> None:
    class Manual(LinearRegression):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    cb = GradientNoiseScale()
    fake = _FakeTrainer(trainer(1).strategy)
    with pytest.warns(UserWarning, match="manual optimization"):
        cb.setup(fake, Manual(), "fit")
    assert not cb.enabled


def test_float64_training_measures_the_noise_scale(tmp_path):
    """precision="64-true": the gradient norms are taken in float64, not refused."""
    monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale={"warmup_steps": 0})
    data = torch.randint(0, 256, (32, 17), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quick_trainer(tmp_path, [monitor], steps=3, accumulate_grad_batches=2, precision="64-true")
        trainer.fit(GPTLightningModule(TINY), DataLoader(data, batch_size=4))
    assert monitor.noise_scale.enabled and monitor.noise_scale.estimator.count == 3
    assert not [w for w in caught if "switched off" in str(w.message)]
    assert monitor.flops.total_flops > 0


# ---------------------------------------------------------------------------------------------- constructor arguments


NAN, INF = math.nan, math.inf


BAD_ARGUMENTS = {  # every constructor argument, with values that must be refused with a ValueError naming it
    "ema_decay": [0, 1.0, 1.5, NAN, "0.99", True],
    "warmup_steps": [-1, 1.5, NAN, "100", True],
    "high_ratio": [1.0, 0.5, NAN, INF, "4", True],
    "low_ratio": [0, 1.0, NAN, "0.25", True],
    "hysteresis": [1.0, 0.5, NAN, INF, "1.5", True],
    "min_measurements": [0, -1, 1.5, "20", True],
    "tokens_fn": [3, "input_ids"],
    "norm_layers": [1, "yes", None],
    "norm_layers_every_n_steps": [0, -1, 1.5, "4", True],
    "norm_layers_scale": [0, -0.5, NAN, INF, "0.5", True],
}


@pytest.mark.parametrize(
    "argument, value", [(arg, value) for arg, values in BAD_ARGUMENTS.items() for value in values], ids=repr
)
def test_bad_argument_is_a_value_error_naming_it(argument, value):
    assert_rejected_by_name(GradientNoiseScale, argument, value)


def test_every_constructor_argument_is_listed():
    assert_every_constructor_argument_listed(GradientNoiseScale, BAD_ARGUMENTS)


@FUZZ
@given(
    argument=st.sampled_from(
        [
            "ema_decay",
            "warmup_steps",
            "high_ratio",
            "low_ratio",
            "hysteresis",
            "min_measurements",
            "tokens_fn",
            "norm_layers_scale",
        ]
    ),
    value=weird_numbers,
)
def test_weird_numbers_are_rejected_by_name_or_stored_finite(argument, value):
    assert_rejected_by_name_or_stored_finite(GradientNoiseScale, argument, value)
