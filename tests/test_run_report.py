"""The end-of-fit run report: verdicts and advice from the numbers (no Trainer), its text, JSON and picture, and
the picture reaching a TensorBoard logger (a short real fit)."""

from __future__ import annotations

import json
import math
import sys

import pytest
from gpt import GPTLightningModule
from helpers import TINY, quick_trainer, target_tokens
from helpers import token_rows as _data
from torch.utils.data import DataLoader

from lightning_scaling.laws.definitions import BESIROGLU_2024, DataConstrainedLaw
from lightning_scaling.run_report import (
    GROUPS,
    HISTORY_COLUMNS,
    REPORT_KEYS,
    ReportThresholds,
    RunHistory,
    build_run_report,
    draw_run_report,
    format_count,
    format_duration,
    format_flops,
    format_percent,
    format_run_report,
    matplotlib_missing,
    save_picture,
)

N = 1e9  # inside the fitted range of the default law (70M to 16B parameters, 5B to 500B tokens)


def _summaries(
    params: float = N,
    tokens: float = 20 * N,
    *,
    mfu: float | None = 0.45,
    gns: float = 200.0,
    batch: float = 256.0,
    unique: float | None = None,
) -> dict:
    unique = tokens if unique is None else unique
    law = DataConstrainedLaw()
    return {
        "flops": {
            "flops": 6 * params * tokens,
            "hardware_flops": 6 * params * tokens,
            "flops_analytic": None,
            "flops_per_sec": 1e15,
            "mfu": mfu,
            "optimizer_steps": 1000,
            "measured_shapes": 1,
            "uncounted_micro_batches": 0,
            "causal_attention": "half",
        },
        "tokens": {
            "tokens": tokens,
            "params": params,
            "non_embedding": False,
            "token_rule": "tokens_fn(batch)",
            "supervised_tokens": None,
        },
        "noise_scale": {
            "gns": gns,
            "gns_stderr": 10.0,
            "gns_tokens": gns * 2048,
            "batch_size": batch,
            "batch_tokens": batch * 2048,
            "measurements": 1000,
            "skipped_nonfinite": 0,
            "mode": "hooks",
            "status": "measured",
        },
        "repetition": {
            "tokens": tokens,
            "unique_tokens": unique,
            "epochs": tokens / unique,
            "effective_tokens": float(law.effective_tokens(tokens, unique)),
            "effective_tokens_per_param": float(law.effective_tokens(tokens, unique)) / params,
            "repetition_value": float(law.repetition_value(tokens, unique)),
            "params": params,
            "distinct_fraction": None,
        },
    }


def _history(steps: int = 5, params: float = N, tokens: float = 20 * N) -> dict:
    history = RunHistory()
    for i in range(1, steps + 1):
        seen = tokens * i / steps
        history.add(
            200 * i,
            {
                "training_tokens": seen,
                "tokens_per_parameter": seen / params,
                "projected_tokens_per_parameter": tokens / params,
                "training_loss": 2.0 + 1.0 / i,
                "noise_scale_samples": 100.0 * i,
                "batch_samples": 256.0,
                "epochs": i / steps,
                "projected_epochs": 1.0,
                "repetition_value": 1.0,
                "mfu": 0.45,
            },
        )
    return history.columns()


# ---------------------------------------------------------------------------------------------- token verdicts
def test_undertrained_run_gets_the_compute_optimal_split_for_its_flops():
    tokens = 2 * N  # 2 tokens per parameter
    report = build_run_report(_summaries(tokens=tokens), _history(tokens=tokens))
    group = report["tokens"]
    assert group["status"] == "undertrained" and not group["flagged"]
    assert group["verdict"].startswith("undertrained: 2 tokens per parameter; about 20 is compute-optimal")
    optimum = BESIROGLU_2024.compute_optimal(6 * N * tokens)
    assert group["compute_optimal"]["parameters"] == pytest.approx(optimum.params)
    assert group["compute_optimal"]["tokens"] == pytest.approx(optimum.tokens)
    assert group["compute_overhead"] == pytest.approx(BESIROGLU_2024.compute_overhead(N, tokens))
    first, longer = group["advice"]
    assert f"for the same {format_flops(6 * N * tokens)} FLOPs (6ND)" in first
    assert f"{format_count(optimum.params)}-parameter model on {format_count(optimum.tokens)} tokens" in first
    assert "nats/token" in first
    assert longer.startswith("keep this model and train 10x longer: 20B tokens")


def test_compute_optimal_run_is_told_how_to_scale_up():
    report = build_run_report(_summaries(tokens=25 * N))
    group = report["tokens"]
    assert group["status"] == "compute-optimal", group["verdict"]
    assert group["compute_overhead"] < 0.10
    lo, hi = group["compute_optimal_band"]
    assert lo < 25 < hi  # the band is where the overhead stays within the threshold
    assert BESIROGLU_2024.compute_overhead(N, lo * N) == pytest.approx(0.10, abs=0.01)
    assert BESIROGLU_2024.compute_overhead(N, hi * N) == pytest.approx(0.10, abs=0.01)
    bigger = BESIROGLU_2024.compute_optimal(10 * 6 * N * 25 * N)
    assert group["advice"] == [
        (
            f"to scale up, grow both: for 10x the compute the besiroglu law's optimum is "
            f"{format_count(bigger.params)} parameters on {format_count(bigger.tokens)} tokens"
        )
    ]


def test_over_trained_run_is_shown_the_cheaper_run_to_the_same_loss():
    tokens = 300 * N
    report = build_run_report(_summaries(tokens=tokens, unique=tokens))
    group = report["tokens"]
    assert group["status"] == "over-trained"
    assert "inference dominates" in group["verdict"]
    cheapest = BESIROGLU_2024.optimal_for_loss(BESIROGLU_2024.loss(N, tokens))
    assert (
        f"{format_count(cheapest.params)}-parameter model on {format_count(cheapest.tokens)} tokens"
        in group["advice"][0]
    )
    assert "ScalingMonitor(inference_tokens=...)" in group["advice"][1]


def test_verdict_outside_the_fitted_range_is_a_flag_not_advice():
    params, tokens = 1e6, 2e6  # far below the 70M parameters and 5B tokens the default law was fitted on
    report = build_run_report(_summaries(params=params, tokens=tokens))
    group = report["tokens"]
    assert group["status"] == "undertrained" and group["flagged"] is True
    assert group["advice"] == []
    (caution,) = group["cautions"]
    assert "70M to 16B parameters and 5B to 500B tokens" in caution and "a flag and not advice" in caution
    assert "[flag: law extrapolated]" in format_run_report(report)


# ------------------------------------------------------------------------------------- the other verdicts
def test_compute_verdicts_from_mfu():
    unknown = build_run_report(_summaries(mfu=None))["compute"]
    assert unknown["status"] == "unknown"
    assert "ScalingMonitor(peak_flops=...)" in unknown["advice"][0]
    low = build_run_report(_summaries(mfu=0.10), training_seconds=3600)["compute"]
    assert low["status"] == "low" and low["verdict"].startswith("MFU 10%")
    assert (
        low["advice"][0] == f"at 40% MFU the same {format_flops(6 * N * 20 * N)} FLOPs would take 15.0 min "
        "instead of 60.0 min"
    )
    assert build_run_report(_summaries(mfu=0.5))["compute"]["status"] == "good"


@pytest.mark.parametrize(
    "batch, status, word", [(4000.0, "large", "E/E_min"), (10.0, "small", "S/S_min"), (256.0, "efficient", None)]
)
def test_batch_verdicts_against_the_noise_scale(batch, status, word):
    group = build_run_report(_summaries(gns=200.0, batch=batch))["batch_size"]
    assert group["status"] == status
    assert group["batch_over_noise_scale"] == pytest.approx(batch / 200.0)
    if word:
        assert word in group["advice"][0]
    else:
        assert group["advice"] == []


@pytest.mark.parametrize(
    "mode, scale, cautioned", [("norm layers", 1.0, True), ("norm layers", 2.0, False), ("hooks", 1.0, False)]
)
def test_an_uncalibrated_norm_layer_estimate_is_cautioned_as_about_half(mode, scale, cautioned):
    summaries = _summaries(gns=200.0, batch=256.0)
    summaries["noise_scale"].update(mode=mode, norm_layers_scale=scale)
    group = build_run_report(summaries)["batch_size"]
    said = " ".join(group["cautions"])
    assert ("reads about half the whole model's" in said) == cautioned
    assert ("norm_layers_scale" in said) == cautioned


def test_batch_without_an_estimate_says_why():
    summaries = _summaries()
    summaries["noise_scale"].update(gns=-3.0, status="no signal yet: the smoothed |G|² estimate is not positive")
    group = build_run_report(summaries)["batch_size"]
    assert group["status"] == "not measured" and group["noise_scale_samples"] is None
    assert "no signal yet" in group["verdict"]


def test_data_verdicts_and_the_data_constrained_optimum():
    fresh = build_run_report(_summaries())["data"]
    assert fresh["status"] == "fresh"
    repeating = build_run_report(_summaries(tokens=20 * N, unique=10 * N))["data"]
    assert repeating["status"] == "repeating" and "worth 94% of a fresh one" in repeating["verdict"]
    many = build_run_report(_summaries(tokens=20 * N, unique=N))["data"]  # 20 epochs
    assert many["status"] == "diminishing"
    best = DataConstrainedLaw().compute_optimal(6 * N * 20 * N, N)
    assert many["data_constrained_optimum"]["epochs"] == pytest.approx(best.epochs)
    assert f"{format_count(best.params)} parameters for {best.epochs:.3g} epochs" in many["advice"][1]
    summaries = _summaries()
    summaries["repetition"].update(unique_tokens=None, epochs=None)
    unknown = build_run_report(summaries)["data"]
    assert unknown["status"] == "unknown" and "ScalingMonitor(unique_tokens=...)" in unknown["advice"][0]


def test_parts_left_out_or_failed_are_said_so():
    summaries = _summaries()
    del summaries["noise_scale"]
    summaries["flops"] = {"error": "RuntimeError: boom"}
    report = build_run_report(summaries)
    assert report["batch_size"]["status"] == "off"
    assert "ScalingMonitor(noise_scale=False)" in report["batch_size"]["verdict"]
    assert report["compute"]["status"] == "error" and "boom" in report["compute"]["verdict"]
    assert report["tokens"]["status"] == "undertrained" or report["tokens"]["status"] == "compute-optimal"


# ------------------------------------------------------------------------------------------ text and JSON
def test_text_has_every_group_units_and_the_paths():
    report = build_run_report(
        _summaries(tokens=2 * N),
        _history(tokens=2 * N),
        training_seconds=5400,
        report_path="/runs/v0/scaling_report.json",
        picture_path="/runs/v0/scaling_report.png",
    )
    text = format_run_report(report)
    lines = text.splitlines()
    assert lines[0] == "lightning-scaling report: 1B parameters on 2B tokens, 1000 optimizer steps in 1.5 h"
    for title in ("compute", "tokens", "batch size", "data"):
        assert any(line.startswith(f"{title:<12}") for line in lines), title
    for unit in (
        "FLOPs (model FLOPs, measured)",
        "FLOP/s",
        "tokens per parameter",
        "compute overhead",
        "samples",
        "tokens per step",
        "unique tokens",
    ):
        assert unit in text, unit
    assert "report      /runs/v0/scaling_report.json" in lines
    assert "picture     /runs/v0/scaling_report.png" in lines
    assert max(len(line) for line in lines if not line.startswith(("report", "picture"))) <= 112


def test_json_is_strict_and_every_key_is_documented():
    report = build_run_report(_summaries(tokens=2 * N), _history())
    json.dumps(report, allow_nan=False)  # no NaN or inf anywhere
    assert set(GROUPS) <= set(report)
    generic = {"status", "verdict", "flagged", "advice", "cautions"}
    for section in ("run", "files", *GROUPS):
        for key in report[section]:
            assert key in generic or f"{section}.{key}" in REPORT_KEYS, f"{section}.{key} is not documented"
    assert set(report["history"]) == set(HISTORY_COLUMNS)


def test_number_formatting_a_person_reads():
    assert format_percent(3.552713678800507e-15) == "0%"  # `plan --flops 3e18` printed "3.553e-13%"
    assert format_percent(0.0004) == "<0.1%"
    assert format_percent(0.0) == "0%" and format_percent(0.0512) == "5.1%" and format_percent(9.828) == "983%"
    assert format_duration(2.7) == "3 s" and format_duration(0.2) == "under 1 s"
    assert format_duration(185) == "3.1 min" and format_duration(7300) == "2.0 h"
    assert format_flops(8.456e12) == "8.46e12" and format_count(163840) == "164k" and format_count(1.1e6) == "1.1M"


def test_history_keeps_its_shape_within_max_points():
    history = RunHistory(max_points=8)
    for step in range(1, 101):
        history.add(step, {"tokens_per_parameter": step / 10})
    columns = history.columns()
    assert len(history) <= 8
    assert columns["step"][0] == 1 and columns["step"][-1] == 100
    assert columns["tokens_per_parameter"][-1] == 10 and columns["epochs"] == [None] * len(history)
    with pytest.raises(ValueError, match="max_points"):
        RunHistory(max_points=0)


def test_bad_thresholds_name_the_argument():
    with pytest.raises(ValueError, match="stop_epochs"):
        ReportThresholds(warn_epochs=10, stop_epochs=5)
    with pytest.raises(ValueError, match="batch_low_ratio"):
        ReportThresholds(batch_low_ratio=2)
    with pytest.raises(ValueError, match="summaries"):
        build_run_report([])


# -------------------------------------------------------------------------------------------------- picture
def test_picture_has_four_labelled_panels(tmp_path):
    pytest.importorskip("matplotlib")
    report = build_run_report(_summaries(tokens=2 * N), _history(tokens=2 * N), planned_steps=2000)
    figure = draw_run_report(report)
    save_picture(figure, str(tmp_path / "run.png"))
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = [ax for ax in figure.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left").split(":")[0] for ax in panels] == [
        "Tokens per parameter",
        "Training loss",
        "Batch size against the gradient noise scale",
        "Epochs and the worth of repeated data",
    ]
    for ax in panels:
        assert ax.get_ylabel() and ax.get_xlabel() == ("optimizer step" if ax in panels[2:] else "")
    # one legend per panel (the data panel's sits on its twin axis, drawn over both)
    assert sum(ax.get_legend() is not None for ax in figure.axes) == 4
    tokens_panel, loss_panel = panels[0], panels[1]
    labels = [line.get_label() for line in tokens_panel.get_lines()]
    assert "projection to the end" in labels  # the run was planned for 2000 steps, the history ends at 1000
    law_line = [line for line in loss_panel.get_lines() if "law" in line.get_label()]
    assert len(law_line) == 1  # inside the fitted range: the law's prediction is drawn
    assert law_line[0].get_ydata()[-1] == pytest.approx(BESIROGLU_2024.loss(N, 2 * N))


def test_without_matplotlib_one_line_and_no_picture(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    assert matplotlib_missing() == "not drawn: matplotlib is not installed (pip install 'lightning-scaling[plot]')"
    from lightning_scaling.callbacks import ScalingMonitor

    monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale=False)
    quick_trainer(tmp_path, [monitor], steps=2).fit(GPTLightningModule(TINY), DataLoader(_data(), batch_size=4))
    assert not (tmp_path / "scaling_report.png").exists()
    report = json.loads((tmp_path / "scaling_report.json").read_text())
    assert report["files"]["picture"] is None and "lightning-scaling[plot]" in report["files"]["picture_note"]
    assert monitor.report_text.splitlines()[-1] == f"picture     {matplotlib_missing()}"


def test_picture_reaches_a_tensorboard_logger(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_scaling.callbacks import ScalingMonitor

    monitor = ScalingMonitor(tokens_fn=target_tokens)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = quick_trainer(tmp_path, [monitor], steps=4, logger=logger, log_every_n_steps=2, accumulate_grad_batches=2)
    trainer.fit(GPTLightningModule(TINY), DataLoader(_data(), batch_size=4))
    logger.experiment.flush()
    directory = tmp_path / "run" / "version_0"
    assert monitor.picture_path == str(directory / "scaling_report.png") and (directory / "scaling_report.png").exists()
    events = EventAccumulator(str(directory), size_guidance={"images": 0})
    events.Reload()
    assert "scaling/report" in events.Tags()["images"]
    (image,) = events.Images("scaling/report")
    assert image.step == 4 and image.width == 1300 and image.height == 850
    history = monitor.report["history"]
    assert history["step"] == [2, 4]  # one row per logging step
    assert all(math.isfinite(v) for v in history["training_loss"])
