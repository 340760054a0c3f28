"""ScalingMonitor end to end: the report, its parts, exact resume, and parts that must not disturb each other.
(2-process DDP totals are in test_reliability_distributed.py.)"""

from __future__ import annotations

import json
import logging
import math

import lightning as L
import pytest
import torch
from gpt import GPTLightningModule
from helpers import TINY, quick_trainer, target_tokens
from helpers import token_rows as _data
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_scaling.callbacks import ScalingMonitor


def test_report_written_with_every_part(tmp_path, caplog):
    monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale={"warmup_steps": 0})
    trainer = quick_trainer(tmp_path, [monitor], steps=6, accumulate_grad_batches=2)
    with caplog.at_level(logging.INFO):
        trainer.fit(GPTLightningModule(TINY), DataLoader(_data(), batch_size=4))
    report = json.loads((tmp_path / "scaling_report.json").read_text())
    assert {"compute", "tokens", "batch_size", "data", "run", "files", "history"} <= set(report)
    assert report == monitor.report
    assert report["tokens"]["training_tokens"] == 6 * 2 * 4 * 16
    assert report["tokens"]["parameters"] == monitor.tokens.params
    assert report["compute"]["model_flops"] > 0 and report["compute"]["optimizer_steps"] == 6
    assert report["data"]["epochs"] == pytest.approx(6 * 2 * 4 / 64)
    assert report["run"]["optimizer_steps"] == 6 and report["run"]["training_seconds"] > 0
    # a tiny model on a few hundred tokens: undertrained, and far outside the law's fitted range
    assert report["tokens"]["status"] == "undertrained" and report["tokens"]["flagged"]
    assert report["files"] == {"report": str(tmp_path / "scaling_report.json"),
                               "picture": str(tmp_path / "scaling_report.png"), "picture_note": None}
    assert (tmp_path / "scaling_report.png").exists()
    # the printed report is the text of the JSON, with where both files are
    # (read from caplog only when another test left Lightning's logger propagating; the text itself is checked)
    printed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning-scaling report:")]
    assert printed in ([], [monitor.report_text])
    assert monitor.report_text.startswith("lightning-scaling report:") and "scaling_report.png" in monitor.report_text
    assert f"report      {tmp_path / 'scaling_report.json'}" in monitor.report_text
    assert "undertrained: " in monitor.report_text
    m = trainer.callback_metrics
    for name in ("scaling/flops", "scaling/tokens", "scaling/tokens_per_param", "scaling/epochs",
                 "scaling/batch_size", "scaling/grad_sq"):
        assert name in m, name
    assert float(m["scaling/batch_size"]) == 2 * 4
    assert report["batch_size"]["measurements"] == 6 and report["batch_size"]["batch_samples"] == 2 * 4
    assert set(monitor.state_dict()) == {"flops", "tokens", "noise_scale", "repetition"}
    # the last step is a logging step: one history row, with the values logged there
    assert report["history"]["step"] == [6]
    assert report["history"]["tokens_per_parameter"] == [pytest.approx(float(m["scaling/tokens_per_param"]))]


def test_print_report_false_keeps_the_text_for_later(tmp_path, caplog):
    monitor = ScalingMonitor(tokens_fn=target_tokens, print_report=False)
    with caplog.at_level(logging.INFO):
        quick_trainer(tmp_path, [monitor], steps=2).fit(GPTLightningModule(TINY), DataLoader(_data(), batch_size=4))
    assert not [r for r in caplog.records if r.getMessage().startswith("lightning-scaling report:")]
    assert monitor.report_text.startswith("lightning-scaling report:")
    assert (tmp_path / "scaling_report.json").exists()
    with pytest.raises(ValueError, match="print_report"):
        ScalingMonitor(print_report="no")


def test_parts_name_the_monitor_in_their_messages():
    monitor = ScalingMonitor()
    assert {part.configured_as for part in monitor.parts.values()} == {"ScalingMonitor"}
    assert monitor.flops.option_hint("peak_flops") == "ScalingMonitor(peak_flops=...)"
    assert monitor.flops.option_hint("max_measured_shapes", "16") == 'ScalingMonitor(flops={"max_measured_shapes": 16})'
    assert monitor.repetition.option_hint("unique_tokens") == "ScalingMonitor(unique_tokens=...)"


def test_parts_can_be_configured_or_left_out(tmp_path):
    monitor = ScalingMonitor(repetition=False, noise_scale=False, flops={"peak_flops": 1e12})
    assert set(monitor.parts) == {"flops", "tokens"}
    assert monitor.flops.peak_flops_override == 1e12
    with pytest.raises(ValueError, match="tokens"):
        ScalingMonitor(tokens="yes")


def _final_counts(monitor: ScalingMonitor) -> dict:
    state = monitor.state_dict()
    return {
        "flops": state["flops"]["total_flops"],
        "tokens": state["tokens"]["tokens"],
        "steps": state["tokens"]["optimizer_steps"],
        "repetition": monitor.repetition.summary()["tokens"],
    }


def test_resume_mid_epoch_continues_counts_exactly(tmp_path):
    data = DataLoader(_data(), batch_size=4, shuffle=False)
    full = ScalingMonitor(tokens_fn=target_tokens)
    L.seed_everything(0, verbose=False)
    quick_trainer(tmp_path / "full", [full], steps=8).fit(GPTLightningModule(TINY), data)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = ScalingMonitor(tokens_fn=target_tokens)
    L.seed_everything(0, verbose=False)
    quick_trainer(tmp_path / "a", [first, ckpt], steps=3, enable_checkpointing=True).fit(GPTLightningModule(TINY), data)
    path = next((tmp_path / "ckpt").glob("*step=3*.ckpt"))

    resumed = ScalingMonitor(tokens_fn=target_tokens)
    quick_trainer(tmp_path / "b", [resumed], steps=8).fit(GPTLightningModule(TINY), data, ckpt_path=str(path))
    assert _final_counts(resumed) == _final_counts(full)
    # the noise scale's books continue (same number of measurements, same settings); its moments depend on which
    # samples the resumed steps see, and Lightning restarts a plain DataLoader's epoch rather than its position
    a, b = resumed.noise_scale.state_dict(), full.noise_scale.state_dict()
    for state in (a, b):
        for key in ("estimator", "norm_estimator"):
            state[key].pop("moments")
    _assert_same_state(a, b)
    assert resumed.noise_scale.norm_estimator.count == full.noise_scale.norm_estimator.count == 2  # steps 0 and 4


def _assert_same_state(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-12)
    else:
        assert a == b


def test_checkpoint_without_our_state_resumes_cleanly(tmp_path):
    data = DataLoader(_data(), batch_size=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    quick_trainer(tmp_path, [ckpt], steps=2, enable_checkpointing=True).fit(GPTLightningModule(TINY), data)
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    quick_trainer(tmp_path, [monitor], steps=4).fit(GPTLightningModule(TINY), data, ckpt_path=str(path))
    # Counting starts where the monitor joined: two steps of 4 x 16 tokens.
    assert monitor.tokens.tokens == 2 * 4 * 16


class _TwoShapes(torch.utils.data.Dataset):
    """Micro-batches of 4 alternate between two sequence lengths, so each new shape's FLOP counting pass
    happens on the second micro-batch of an accumulation window, while the noise scale's hooks listen."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randint(0, 256, (9 if (i // 4) % 2 == 0 else 17,), generator=g)


def test_flop_measurement_leaves_the_noise_scale_unchanged(tmp_path):
    def noise_state(flops):
        L.seed_everything(0, verbose=False)
        monitor = ScalingMonitor(flops=flops, tokens=False, repetition=False, noise_scale={"warmup_steps": 0})
        trainer = quick_trainer(tmp_path, [monitor], steps=4, accumulate_grad_batches=2)
        trainer.fit(GPTLightningModule(TINY), DataLoader(_TwoShapes(), batch_size=4, shuffle=False))
        if flops:
            assert monitor.flops.measured_shapes == 2  # both shapes were measured mid-window
        return monitor.noise_scale.state_dict()

    _assert_same_state(noise_state(True), noise_state(False))
