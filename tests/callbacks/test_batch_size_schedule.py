"""BatchSizeSchedule: its decisions, where a change lands in Lightning's accumulation windows
(never inside one), the learning-rate rules with schedulers, logs and messages, checkpoint kill-and-resume, and
2-rank DDP agreement (every rank changes at the same step).

Most runs use a scripted noise scale (a GradientNoiseScale whose estimate is a function of the optimizer step), so
each decision is known in advance; the DDP run and one single-process run use the real measurement on the
closed-form regression of McCandlish et al. 2018 (App. A), where B_simple = d + 1 + dσ²/|δ|² = 33 samples.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import TRUE_B_SIMPLE, regression_data
from helpers import ClosedFormRegression as Regression
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

import lightning_scaling.callbacks.batch_size_schedule as schedule_module
from lightning_scaling.callbacks import ScalingMonitor
from lightning_scaling.callbacks.batch_size_schedule import BatchSizeSchedule
from lightning_scaling.callbacks.gradient_noise_scale import GradientNoiseScale
from lightning_scaling.estimators.noise_scale import NoiseScaleEstimate


# --------------------------------------------------------------------------------------------------- fixtures
class ScriptedNoiseScale(GradientNoiseScale):
    """A GradientNoiseScale whose estimate is ``script(optimizer step)`` samples, measured from step 1 on, and whose
    ``batch_size`` is the global batch of the last step (micro-batch × accumulation × ranks)."""

    def __init__(self, script: Callable[[int], float]) -> None:
        super().__init__(warmup_steps=0)
        self.script = script
        self.step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step != self.step:
            self.step = trainer.global_step
            self.batch_size = float(len(batch[0]) * trainer.accumulate_grad_batches * trainer.world_size)

    def estimate(self) -> NoiseScaleEstimate:
        b = float(self.script(self.step)) if self.step else math.nan
        return NoiseScaleEstimate(b, 0.0, 1.0, b, self.step)


class Windows(L.Callback):
    """Every optimizer step's accumulation window: its micro-batches (epoch, batch_idx, accumulation in force at
    the micro-batch's start), where the gradients were zeroed, and the accumulation at the step."""

    def __init__(self) -> None:
        self.windows: list[dict[str, Any]] = []
        self._open: list[tuple[int, int, int]] = []
        self._zeroed: list[tuple[int, int]] = []
        self.batches_per_epoch = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches_per_epoch = int(trainer.num_training_batches)
        self._open.append((trainer.current_epoch, batch_idx, int(trainer.accumulate_grad_batches)))

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        self._zeroed.append(self._open[-1][:2])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.windows.append({"micro": self._open, "zeroed": self._zeroed, "k": int(trainer.accumulate_grad_batches)})
        self._open, self._zeroed = [], []


def assert_whole_windows(recorder: Windows) -> None:
    """No optimizer step has a partial accumulation window, except the last one of an epoch (Lightning's own)."""
    assert recorder.windows
    for i, window in enumerate(recorder.windows):
        micro, k = window["micro"], window["k"]
        epochs = {epoch for epoch, _, _ in micro}
        indices = [idx for _, idx, _ in micro]
        assert len(epochs) == 1, (i, window)
        assert {ki for _, _, ki in micro} == {k}, (i, window)  # one accumulation for the whole window
        assert indices == list(range(indices[0], indices[0] + len(indices))), (i, window)
        assert indices[0] % k == 0, (i, window)  # starts where Lightning zeroes the gradients ...
        assert window["zeroed"] == [micro[0][:2]], (i, window)  # ... and it did, once, before the first
        epoch_end = indices[-1] + 1 == recorder.batches_per_epoch
        assert len(micro) == k or (epoch_end and len(micro) < k), (i, window)


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))


def fit(
    callbacks: list[L.Callback],
    tmp_path: Path,
    module: L.LightningModule | None = None,
    data: DataLoader | None = None,
    **kwargs: Any,
) -> L.Trainer:
    opts: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": -1,
        "max_epochs": 3,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": tmp_path,
    }
    opts.update(kwargs)
    trainer = L.Trainer(callbacks=callbacks, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module or Regression(), data if data is not None else regression_data(40, 2))
    return trainer


def fast(**kwargs: Any) -> BatchSizeSchedule:
    """A schedule that acts as soon as the script allows: no patience, spacing or measurements to wait for."""
    opts: dict[str, Any] = {
        "max_accumulate_grad_batches": 8,
        "patience": 1,
        "min_steps_between_changes": 1,
        "min_measurements": 1,
    }
    opts.update(kwargs)
    return BatchSizeSchedule(**opts)


def in_order(
    gns: GradientNoiseScale, schedule: BatchSizeSchedule, windows: Windows, schedule_first: bool
) -> list[L.Callback]:
    """The callbacks with the schedule before the noise scale (it then decides at the next micro-batch's start) or
    after it (at the end of the micro-batch that stepped); the window recorder last, to see what the step used."""
    return [schedule, gns, windows] if schedule_first else [gns, schedule, windows]


def transitions(schedule: BatchSizeSchedule) -> list[tuple[int, int, int]]:
    return [(int(c["step"]), int(c["from"]), int(c["to"])) for c in schedule.changes]


# ----------------------------------------------------------------------------------------- where changes land
@pytest.mark.parametrize("schedule_first", [False, True], ids=["after-noise-scale", "before-noise-scale"])
def test_changes_land_between_whole_windows_and_epoch_ends_are_lightnings_own(tmp_path, schedule_first):
    # 20 micro-batches of 2 per epoch, 3 epochs; the script always asks for more: 1 -> 2 -> 4 -> 8
    gns, schedule, windows = ScriptedNoiseScale(lambda step: 1e9), fast(), Windows()
    trainer = fit(in_order(gns, schedule, windows, schedule_first), tmp_path)
    # step 1 ends after micro-batch 0: batch 1 cannot start a window of 2, so the change waits one step
    assert transitions(schedule) == [(2, 1, 2), (3, 2, 4), (4, 4, 8)]
    assert trainer.accumulate_grad_batches == 8 == schedule.accumulate_grad_batches
    assert_whole_windows(windows)
    sizes = [len(w["micro"]) for w in windows.windows]
    # epoch 0: 1, 1, 2, 4, 8, then Lightning's short last window (4); epochs 1 and 2: 8, 8, 4
    assert sizes == [1, 1, 2, 4, 8, 4] + [8, 8, 4] * 2
    assert trainer.global_step == len(sizes)


def test_a_change_that_would_split_a_window_waits_for_the_next_boundary(tmp_path):
    # from accumulation 2 the script asks at step 1 (after micro-batches 0-1): batch 2 is not a multiple of 4
    gns, schedule, windows = ScriptedNoiseScale(lambda step: 1e9), fast(max_accumulate_grad_batches=4), Windows()
    trainer = fit([gns, schedule, windows], tmp_path, max_epochs=1, accumulate_grad_batches=2)
    assert transitions(schedule) == [(2, 2, 4)]
    assert_whole_windows(windows)
    assert [len(w["micro"]) for w in windows.windows] == [2, 2, 4, 4, 4, 4]
    assert trainer.global_step == 6


@pytest.mark.parametrize("schedule_first", [False, True], ids=["after-noise-scale", "before-noise-scale"])
def test_epoch_start_is_a_boundary_for_any_accumulation(tmp_path, schedule_first):
    # 12 micro-batches per epoch at accumulation 4: windows 0-3, 4-7, 8-11. The script asks from step 3 on (the
    # epoch's last step): batch 12 would not start a window of 8, but the next micro-batch is batch 0 of epoch 1.
    gns, schedule, windows = ScriptedNoiseScale(lambda step: 1e9 if step >= 3 else 0.0), fast(), Windows()
    fit(
        in_order(gns, schedule, windows, schedule_first),
        tmp_path,
        data=regression_data(24, 2),
        max_epochs=2,
        accumulate_grad_batches=4,
    )
    assert transitions(schedule) == [(3, 4, 8)]
    assert_whole_windows(windows)
    assert [len(w["micro"]) for w in windows.windows] == [4, 4, 4, 8, 4]


@pytest.mark.parametrize("schedule_first", [False, True], ids=["after-noise-scale", "before-noise-scale"])
def test_an_epochs_short_last_window_does_not_count_as_the_batch_in_use(tmp_path, schedule_first):
    # 10 micro-batches per epoch at accumulation 4: windows 0-3, 4-7 and Lightning's short 8-9 (step 3). Its global
    # batch (4 samples, not 8) is not the batch in use: a script that asks at step 3 only changes nothing ...
    gns, schedule = ScriptedNoiseScale(lambda step: 1e9 if step == 3 else 0.0), fast()
    fit(
        in_order(gns, schedule, Windows(), schedule_first),
        tmp_path,
        data=regression_data(20, 2),
        max_epochs=2,
        accumulate_grad_batches=4,
    )
    assert schedule.changes == []
    # ... and one that asks from step 3 on decides at step 4 (a whole window, 8 samples), which ends at batch 3 of
    # epoch 1: batch 4 cannot start a window of 8, so the change lands after step 5.
    gns, schedule, windows = ScriptedNoiseScale(lambda step: 1e9 if step >= 3 else 0.0), fast(), Windows()
    fit(
        in_order(gns, schedule, windows, schedule_first),
        tmp_path,
        data=regression_data(20, 2),
        max_epochs=2,
        accumulate_grad_batches=4,
    )
    assert transitions(schedule) == [(5, 4, 8)]
    assert schedule.changes[0]["global_batch"] == 8
    assert_whole_windows(windows)
    assert [len(w["micro"]) for w in windows.windows] == [4, 4, 2, 4, 4, 2]


# ------------------------------------------------------------------------------------------------- decisions
@pytest.mark.parametrize("trigger_ratio, final", [(2.0, 8), (4.0, 4), (100.0, 1)])
def test_trigger_ratio_sets_where_the_batch_stops_growing(tmp_path, trigger_ratio, final):
    # B_simple = 30 samples, micro-batch 2: the batch doubles while 30 > ratio x batch (2, 4, 8, 16 ...)
    gns = ScriptedNoiseScale(lambda step: 30.0)
    schedule = fast(trigger_ratio=trigger_ratio, max_accumulate_grad_batches=64)
    trainer = fit([gns, schedule], tmp_path)
    assert trainer.accumulate_grad_batches == final
    assert all(c["b_simple"] > trigger_ratio * c["global_batch"] for c in schedule.changes)
    assert [c["global_batch"] for c in schedule.changes] == [2.0 * 2**i for i in range(len(schedule.changes))]


def test_patience_is_consecutive_steps_above_the_trigger(tmp_path):
    flicker = ScriptedNoiseScale(lambda step: 1e9 if step % 2 else 0.0)  # above on odd steps only
    patient = fast(patience=2)
    fit([flicker, patient], tmp_path)
    assert patient.changes == []
    steady = ScriptedNoiseScale(lambda step: 1e9 if step >= 5 else 0.0)
    schedule = fast(patience=3)
    fit([steady, schedule], tmp_path)
    # above at steps 5, 6, 7: due after step 7, whose next micro-batch (batch 7) cannot start a window of 2
    assert schedule.changes[0]["step"] == 8


def test_min_measurements_and_min_steps_between_changes(tmp_path):
    gns, windows = ScriptedNoiseScale(lambda step: 1e9), Windows()
    schedule = fast(min_measurements=6, min_steps_between_changes=5, max_accumulate_grad_batches=16)
    fit([gns, schedule, windows], tmp_path, data=regression_data(128, 2), max_epochs=2)
    steps = [int(c["step"]) for c in schedule.changes]
    assert steps[0] >= 6
    assert len(steps) == 4 and all(b - a >= 5 for a, b in itertools.pairwise(steps)), steps
    assert_whole_windows(windows)


def test_stops_at_the_maximum_and_says_so_once(tmp_path, monkeypatch):
    said: list[str] = []
    monkeypatch.setattr(schedule_module, "rank_zero_info", said.append)
    from lightning_scaling.callbacks import _common

    monkeypatch.setattr(_common, "rank_zero_info", said.append)
    gns, schedule = ScriptedNoiseScale(lambda step: 1e9), fast(max_accumulate_grad_batches=5)
    trainer = fit([gns, schedule], tmp_path)
    assert trainer.accumulate_grad_batches == 4  # 1, 2, 4; 8 would pass 5
    assert transitions(schedule) == [(2, 1, 2), (3, 2, 4)]
    changes = [m for m in said if "the batch doubles" in m]
    assert len(changes) == 2
    assert "accumulate_grad_batches 1 -> 2, global batch 4 samples" in changes[0]
    assert "accumulate_grad_batches 2 -> 4, global batch 8 samples" in changes[1]
    assert "the learning rate is unchanged" in changes[0]
    assert sum("max_accumulate_grad_batches=5" in m for m in said) == 1


@pytest.mark.parametrize("b_simple", [math.nan, -50.0, 0.0])
def test_no_usable_estimate_changes_nothing(tmp_path, b_simple):
    gns, schedule = ScriptedNoiseScale(lambda step: b_simple), fast()
    trainer = fit([gns, schedule], tmp_path, max_epochs=1)
    assert schedule.changes == [] and trainer.accumulate_grad_batches == 1


def test_real_noise_scale_on_the_closed_form_problem(tmp_path):
    # B_simple = 33 samples; micro-batch 4 at accumulation 2 is a global batch of 8. With trigger_ratio 2 the batch
    # doubles while 33 > 2 x batch: 8 -> 16 surely, 16 -> 32 only when the estimate reads above 32 (it is within
    # the noise of 33), and never 32 -> 64.
    gns = GradientNoiseScale(warmup_steps=0, ema_decay=0.95)
    schedule = BatchSizeSchedule(
        max_accumulate_grad_batches=64, patience=3, min_steps_between_changes=30, min_measurements=30
    )
    windows = Windows()
    trainer = fit(
        [gns, schedule, windows], tmp_path, data=regression_data(4096, 4), max_epochs=1, accumulate_grad_batches=2
    )
    assert transitions(schedule)[0][1:] == (2, 4)
    assert trainer.accumulate_grad_batches in (4, 8)
    for change in schedule.changes:
        assert change["b_simple"] > 2 * change["global_batch"]
    assert gns.estimate().b_simple == pytest.approx(TRUE_B_SIMPLE, rel=0.25)  # measured on through the changes
    assert_whole_windows(windows)


# ------------------------------------------------------------------------------------------- learning rates
# each builds a scheduler for an optimizer; ``scale`` multiplies the learning rates it sets itself (OneCycleLR's)
SCHEDULERS: dict[str, Callable[..., Any]] = {
    "lambda": lambda opt, scale=1.0: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s)),
    "onecycle": lambda opt, scale=1.0: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2 * scale, total_steps=40),
    "warmup-cosine": lambda opt, scale=1.0: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40),
        ],
        milestones=[3],
    ),
}


@pytest.mark.parametrize("rule, per_change", [("none", 1.0), ("linear", 2.0), ("sqrt", math.sqrt(2.0))])
@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_learning_rate_rule_scales_every_group_and_keeps_the_schedule_shape(tmp_path, rule, per_change, kind):
    # steps 2, 3 and 4 double the batch (see the first test); the scheduler is stepped after every step. At the end
    # the learning rate must be what the same schedule gives from the start at every learning rate × factor³.
    gns, schedule = ScriptedNoiseScale(lambda step: 1e9), fast(lr_scaling=rule)
    module = Regression(lr=0.05, scheduler=SCHEDULERS[kind])
    trainer = fit([gns, schedule], tmp_path, module=module, max_epochs=1)
    factor = per_change**3
    assert len(schedule.changes) == 3 and schedule.lr_factor == pytest.approx(factor)
    reference_opt = torch.optim.SGD(Regression().parameters(), lr=0.05 * factor)
    reference = SCHEDULERS[kind](reference_opt, factor)
    for _ in range(trainer.global_step):
        reference_opt.step()
        reference.step()
    got = trainer.optimizers[0].param_groups[0]["lr"]
    assert got == pytest.approx(reference_opt.param_groups[0]["lr"], rel=1e-9)
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == pytest.approx(reference.get_last_lr())


# --------------------------------------------------------------------------------------------- logs, errors
def test_every_change_is_logged_to_the_loggers(tmp_path):
    logger = MemoryLogger()
    gns, schedule = ScriptedNoiseScale(lambda step: 1e9), fast(lr_scaling="sqrt")
    trainer = fit([gns, schedule], tmp_path, logger=logger, max_epochs=1, log_every_n_steps=1000)
    rows = [m for _, m in logger.rows if "scaling/accumulate_grad_batches" in m]
    assert [m["scaling/accumulate_grad_batches"] for m in rows] == [1, 2, 4, 8]  # train start, then each change
    assert [m.get("scaling/global_batch") for m in rows] == [None, 4, 8, 16]
    assert [m["scaling/lr_factor"] for m in rows] == pytest.approx([1, 2**0.5, 2, 2**1.5])
    steps = [s for s, m in logger.rows if "scaling/global_batch" in m]
    assert steps == [2, 3, 4]  # at the step each change happened after
    assert float(trainer.callback_metrics["scaling/accumulate_grad_batches"]) == 8


BAD_ARGUMENTS = {
    "max_accumulate_grad_batches": [0, -4, 2.5, math.nan, math.inf, "8", True, None],
    "trigger_ratio": [0, -1.0, math.nan, math.inf, "2", True],
    "patience": [0, -1, 1.5, math.nan, "3", True],
    "min_steps_between_changes": [0, -1, 2.5, math.inf, "50", True],
    "min_measurements": [0, -1, 1.5, math.nan, "20", True],
    "lr_scaling": ["quadratic", "Linear", None, 2, True],
}


@pytest.mark.parametrize("name, value", [(n, v) for n, values in BAD_ARGUMENTS.items() for v in values])
def test_bad_arguments_name_the_argument(name, value):
    kwargs = {"max_accumulate_grad_batches": 8, name: value}
    with pytest.raises(ValueError, match=name):
        BatchSizeSchedule(**kwargs)


def test_without_a_noise_scale_fit_says_what_to_add(tmp_path):
    with pytest.raises(ValueError, match=r"add GradientNoiseScale\(\) or ScalingMonitor\(\)"):
        fit([fast()], tmp_path)
    # a ScalingMonitor without its noise-scale part has none either
    with pytest.raises(ValueError, match="add GradientNoiseScale"):
        fit([ScalingMonitor(noise_scale=False, report=False), fast()], tmp_path)


def test_finds_the_noise_scale_inside_scaling_monitor(tmp_path):
    monitor, schedule = ScalingMonitor(report=False, noise_scale={"warmup_steps": 0}), fast()
    fit([schedule, monitor], tmp_path, max_epochs=1, accumulate_grad_batches=2)
    assert schedule.noise_scale is monitor.parts["noise_scale"]


def test_refuses_what_would_fight_over_the_accumulation(tmp_path):
    with pytest.raises(ValueError, match="GradientAccumulationScheduler"):
        fit([GradientNoiseScale(), fast(), GradientAccumulationScheduler({0: 1, 1: 2})], tmp_path)
    with pytest.raises(
        ValueError,
        match=r"max_accumulate_grad_batches \(8\) is below the Trainer's "
        r"accumulate_grad_batches \(16\)",
    ):
        fit([GradientNoiseScale(), fast()], tmp_path, accumulate_grad_batches=16)

    class Manual(Regression):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic optimization"):
        fit([GradientNoiseScale(), fast()], tmp_path, module=Manual())


# ------------------------------------------------------------------------------------------------- resume
class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("schedule_first", [False, True], ids=["after-noise-scale", "before-noise-scale"])
def test_kill_and_resume_continues_with_the_same_accumulation_and_learning_rate(tmp_path, schedule_first):
    # Two alternating micro-batches (A, B, A, B, ...): Lightning restarts a plain DataLoader from its first batch
    # when it resumes mid-epoch, and every window starts at an even batch index, so the resumed run sees what the
    # uninterrupted one sees. The script asks for a larger batch from step 3 on; with 3 steps between changes and
    # each change waiting for a window boundary of the new value, they land after steps 4, 8 and 11. The run is
    # stopped at step 5 (at accumulation 4, between the first two) and resumed to step 12.
    block = regression_data(4, 2, seed=1).dataset.tensors
    data = DataLoader(TensorDataset(block[0].repeat(64, 1), block[1].repeat(64)), batch_size=2, shuffle=False)
    stop, steps = 5, 12

    def make() -> tuple[list[L.Callback], BatchSizeSchedule, Windows]:
        gns = ScriptedNoiseScale(lambda step: 1e9 if step >= 3 else 0.0)
        schedule = fast(lr_scaling="linear", min_steps_between_changes=3, max_accumulate_grad_batches=16)
        windows = Windows()
        return ([schedule, gns, windows] if schedule_first else [gns, schedule, windows]), schedule, windows

    def module() -> Regression:
        return Regression(lr=0.02, scheduler=SCHEDULERS["lambda"])

    L.seed_everything(0, verbose=False)
    callbacks, full, _ = make()
    full_trainer = fit(
        callbacks,
        tmp_path / "full",
        module=module(),
        data=data,
        max_epochs=-1,
        max_steps=steps,
        accumulate_grad_batches=2,
    )

    callbacks, _, _ = make()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop, save_top_k=-1)
    stopped = fit(
        [*callbacks, StopAt(stop), checkpoint],
        tmp_path / "a",
        module=module(),
        data=data,
        max_epochs=-1,
        max_steps=steps,
        accumulate_grad_batches=2,
        enable_checkpointing=True,
    )
    assert stopped.global_step == stop and stopped.accumulate_grad_batches == 4
    path = next((tmp_path / "ckpt").glob(f"*step={stop}*.ckpt"))

    callbacks, resumed, windows = make()
    resumed_module = module()
    trainer = L.Trainer(
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        max_steps=steps,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path / "b",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(resumed_module, data, ckpt_path=str(path))

    assert transitions(full) == [(4, 2, 4), (8, 4, 8), (11, 8, 16)]
    assert transitions(resumed) == transitions(full)
    assert trainer.global_step == steps and trainer.accumulate_grad_batches == full_trainer.accumulate_grad_batches
    assert resumed.lr_factor == full.lr_factor == 8.0
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([0.02 * 8])
    final_lr = full_trainer.optimizers[0].param_groups[0]["lr"]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(final_lr)
    torch.testing.assert_close(resumed_module.lin.weight, full_trainer.lightning_module.lin.weight)
    assert_whole_windows(windows)
    assert windows.windows[0]["k"] == 4  # the first step after the resume already runs at the restored value


# --------------------------------------------------------------------------------------------- 2-rank DDP
SCRIPT = textwrap.dedent("""
    import json, os, sys, warnings
    import lightning as L, torch
    from helpers import ClosedFormRegression as Regression, regression_data
    from test_batch_size_schedule import Windows
    from lightning_scaling.callbacks import ScalingMonitor
    from lightning_scaling.callbacks.batch_size_schedule import BatchSizeSchedule

    OUT = sys.argv[1]
    RANK0 = os.environ.get("LOCAL_RANK", "0") == "0"
    warnings.filterwarnings("ignore", message=".*(does not have many workers|sync_dist|LOCAL_RANK).*")

    def run(name, schedule_first):
        if RANK0:
            print(f"=== begin {name} ===", file=sys.stderr, flush=True)
        monitor = ScalingMonitor(report=False, flops=False, tokens=False, repetition=False,
                                 noise_scale={"warmup_steps": 0, "ema_decay": 0.9})
        schedule = BatchSizeSchedule(max_accumulate_grad_batches=4, trigger_ratio=1.0, patience=2,
                                     min_steps_between_changes=4, min_measurements=5)
        windows = Windows()
        callbacks = [schedule, monitor, windows] if schedule_first else [monitor, schedule, windows]
        trainer = L.Trainer(callbacks=callbacks, max_steps=40, strategy="ddp", accelerator="cpu", devices=2,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=os.path.join(os.path.dirname(OUT), name))
        module = Regression()
        trainer.fit(module, regression_data(4096, 4))
        torch.distributed.barrier()
        if RANK0:
            print(f"=== end {name} ===", file=sys.stderr, flush=True)
        return {"changes": schedule.changes, "k": trainer.accumulate_grad_batches, "windows": windows.windows,
                "batches_per_epoch": windows.batches_per_epoch, "gns": monitor.noise_scale.estimate().b_simple,
                "global_step": trainer.global_step}

    results = {"after": run("after", False), "before": run("before", True)}
    with open(f"{OUT}.rank{torch.distributed.get_rank()}.json", "w") as fh:
        json.dump(results, fh)
""")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schedule_ddp")
    script = tmp / "schedule_ddp.py"
    script.write_text(SCRIPT)
    out = tmp / "results"
    env = dict(os.environ)
    here = Path(__file__).resolve().parent  # the script imports Windows from this module, and tests/helpers.py
    env["PYTHONPATH"] = os.pathsep.join(
        [str(here), str(here.parent), str(here.parents[1] / "examples"), env.get("PYTHONPATH", "")]
    )
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    # ranks that disagreed on the accumulation would wait for each other forever: the timeout is the failure
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("run", ["after", "before"])
def test_every_rank_changes_at_the_same_step(two_ranks, run):
    ranks, stderr = two_ranks
    zero, one = ranks[0][run], ranks[1][run]
    # the global batch is 2 ranks x 4 samples x accumulation: 8 -> 16 -> 32 while B_simple ≈ 33 > batch
    assert [(c["step"], c["from"], c["to"]) for c in zero["changes"]] == [
        (c["step"], c["from"], c["to"]) for c in one["changes"]
    ]
    assert zero["changes"] == one["changes"]  # the very same numbers, decided apart on each rank
    assert [(c["from"], c["to"]) for c in zero["changes"]] == [(1, 2), (2, 4)]
    assert [c["global_batch"] for c in zero["changes"]] == [8.0, 16.0]
    assert zero["k"] == one["k"] == 4 and zero["global_step"] == one["global_step"] == 40
    assert zero["gns"] == one["gns"] == pytest.approx(TRUE_B_SIMPLE, rel=0.5)
    for rank in ranks:
        recorder = Windows()
        recorder.windows, recorder.batches_per_epoch = rank[run]["windows"], rank[run]["batches_per_epoch"]
        assert_whole_windows(recorder)
    section = stderr.split(f"=== begin {run} ===", 1)[1].split(f"=== end {run} ===", 1)[0]
    assert section.count("the batch doubles") == 2  # said once per change, on rank zero only
