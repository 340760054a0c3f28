"""ScalingMonitor end to end: the report, its parts, exact resume, parts that must not disturb each other, its
constructor arguments; and faults: the monitor never crashes a user's run over its own bookkeeping. Non-finite
losses and gradients, an empty batch, batches we cannot count, logger-less, fast_dev_run, validation-only,
predict-only and epoch-bounded runs each get at most one clear warning per kind (and never our "switched off
after an error"), no exception, and the counts stay right. (Multi-process runs: tests/integration/.)"""

from __future__ import annotations

import json
import logging
import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from gpt import GPTLightningModule
from helpers import (
    FUZZ,
    TINY,
    assert_every_constructor_argument_listed,
    assert_no_nan_metrics,
    assert_rejected_by_name,
    captured,
    quick_trainer,
    target_tokens,
)
from helpers import token_rows as _data
from hypothesis import given
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
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
    assert report["files"] == {
        "report": str(tmp_path / "scaling_report.json"),
        "picture": str(tmp_path / "scaling_report.png"),
        "picture_note": None,
    }
    assert (tmp_path / "scaling_report.png").exists()
    # the printed report is the text of the JSON, with where both files are
    # (read from caplog only when another test left Lightning's logger propagating; the text itself is checked)
    printed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning-scaling report:")]
    assert printed in ([], [monitor.report_text])
    assert monitor.report_text.startswith("lightning-scaling report:") and "scaling_report.png" in monitor.report_text
    assert f"report      {tmp_path / 'scaling_report.json'}" in monitor.report_text
    assert "undertrained: " in monitor.report_text
    m = trainer.callback_metrics
    for name in (
        "scaling/flops",
        "scaling/tokens",
        "scaling/tokens_per_param",
        "scaling/epochs",
        "scaling/batch_size",
        "scaling/grad_sq",
    ):
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


def _assert_same_state(a, b, path: str = "state", rel: float = 1e-6) -> None:
    """The same keys and lengths all the way down; tensors close, floats equal to ``rel`` (NaN to NaN)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _assert_same_state(a[key], b[key], f"{path}.{key}", rel)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, msg=path)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-12), path
    else:
        assert a == b, path


# ------------------------------------------------------------------------------------------------------------- resume


def _counters(monitor: ScalingMonitor) -> dict:
    state = monitor.state_dict()
    rep = monitor.repetition.summary()
    return {
        "flops": state["flops"]["total_flops"],
        "analytic": state["flops"]["total_analytic_flops"],
        "flop_steps": state["flops"]["optimizer_steps"],
        "tokens": state["tokens"]["tokens"],
        "token_steps": state["tokens"]["optimizer_steps"],
        "repetition": {
            k: rep[k]
            for k in (
                "tokens",
                "samples",
                "epochs",
                "effective_tokens",
                "repetition_value",
                "projected_epochs",
                "warned",
            )
        },
    }


def _monitor():
    # warmup 0 and 1 measurement so the batch-vs-noise-scale zone logic runs too
    return ScalingMonitor(
        tokens_fn=target_tokens,
        unique_tokens=32 * 16.0,
        noise_scale={"warmup_steps": 0, "min_measurements": 1},
        repetition={"warn_epochs": 1.0, "stop_epochs": 2.0},
    )


class StopAt(L.Callback):
    """Interrupt a run planned for more steps (as a crash or a preemption would), mid-epoch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_resume_mid_epoch_with_accumulation_equals_an_uninterrupted_run(tmp_path):
    # Lightning restarts a plain (non-stateful) DataLoader from its first batch when it resumes mid-epoch, so the
    # data cycles through two micro-batches (A, B, A, B, ...): the resumed run then sees exactly the batches the
    # uninterrupted one does, and the noise-scale measurements can be compared number for number.
    block = _data(4)
    data = DataLoader(block.repeat(16, 1), batch_size=2, shuffle=False)  # 32 micro-batches = 16 steps per epoch
    steps, stop = 10, 5

    L.seed_everything(0, verbose=False)
    full = _monitor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quick_trainer(tmp_path / "full", [full], steps=steps, accumulate_grad_batches=2).fit(
            GPTLightningModule(TINY), data
        )

        L.seed_everything(0, verbose=False)
        first = _monitor()
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop, save_top_k=-1)
        interrupted = quick_trainer(
            tmp_path / "a",
            [first, StopAt(stop), ckpt],
            steps=steps,
            accumulate_grad_batches=2,
            enable_checkpointing=True,
        )
        interrupted.fit(GPTLightningModule(TINY), data)
        assert interrupted.global_step == stop
        path = next((tmp_path / "ckpt").glob(f"*step={stop}*.ckpt"))

        resumed = _monitor()
        trainer = quick_trainer(tmp_path / "b", [resumed], steps=steps, accumulate_grad_batches=2)
        trainer.fit(GPTLightningModule(TINY), data, ckpt_path=str(path))
    assert trainer.global_step == steps
    assert _counters(resumed) == _counters(full)
    assert resumed.tokens.tokens == steps * 2 * 2 * 16
    # 10 steps x 4 rows x 16 tokens over 512 unique tokens: 1.25 epochs, past warn_epochs=1, recorded once
    assert full.repetition.warned and resumed.repetition.warned == full.repetition.warned
    _assert_same_state(resumed.noise_scale.state_dict(), full.noise_scale.state_dict(), rel=1e-5)
    assert resumed.noise_scale.norm_estimator.count == full.noise_scale.norm_estimator.count > 0
    assert resumed.noise_scale.estimator.count == steps


def test_checkpoint_from_a_run_without_our_callbacks_resumes_with_them(tmp_path):
    data = DataLoader(_data(64), batch_size=2, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3)
        quick_trainer(tmp_path, [ckpt], steps=3, accumulate_grad_batches=2, enable_checkpointing=True).fit(
            GPTLightningModule(TINY), data
        )
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    assert "ScalingMonitor" not in str(torch.load(path, weights_only=False).get("callbacks", {}))
    monitor = _monitor()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer = quick_trainer(tmp_path, [monitor], steps=7, accumulate_grad_batches=2)
        trainer.fit(GPTLightningModule(TINY), data, ckpt_path=str(path))
    messages = [str(r.message) for r in records]
    assert not [m for m in messages if "switched off after an error" in m], messages
    assert trainer.global_step == 7
    # counting starts where the monitor joined: 4 steps of 2 micro-batches of 2 x 16 tokens
    assert monitor.tokens.tokens == 4 * 2 * 2 * 16 and monitor.tokens.optimizer_steps == 4
    assert monitor.flops.optimizer_steps == 4 and monitor.flops.total_flops > 0
    assert monitor.repetition.summary()["tokens"] == 4 * 2 * 2 * 16
    assert monitor.noise_scale.estimator.count == 4


# ------------------------------------------------------------ faults: non-finite steps, empty and uncountable batches


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


def test_nan_loss_and_gradients_on_one_step_with_accumulation(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale={"warmup_steps": 0})
    module = NaNOnceGPT(bad_batch_idx=5)  # step 3's second micro-batch
    with captured() as cap:
        trainer = quick_trainer(tmp_path, [monitor], steps=6, accumulate_grad_batches=2)
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
    assert_no_nan_metrics(trainer)
    report = json.loads((tmp_path / "scaling_report.json").read_text(), parse_constant=_refuse)
    assert report["tokens"]["training_tokens"] == 6 * 2 * 2 * 16
    # a skipped step is counted, and said once (when the first one happens)
    assert len(cap.matching("^ScalingMonitor \\(noise_scale\\): step 3: the gradients are not finite")) == 1


def _refuse(name):
    raise AssertionError(f"report holds {name}")


class SkipNonFiniteGPT(GPTLightningModule):
    def configure_optimizers(self):
        return SkipNonFiniteAdamW(self.parameters(), lr=1e-3)


def test_an_empty_batch_counts_as_zero_and_switches_nothing_off(tmp_path):
    full = _data(4, seed=1)
    batches = [full, full, full[:0], full, full, full]  # the third batch has 0 rows
    monitor = ScalingMonitor(tokens_fn=target_tokens, unique_tokens=4096.0, noise_scale={"warmup_steps": 0})
    with captured() as cap:
        trainer = quick_trainer(tmp_path, [monitor], steps=3, accumulate_grad_batches=2)
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
    assert_no_nan_metrics(trainer)


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
        trainer = quick_trainer(tmp_path, [monitor], steps=4, accumulate_grad_batches=2)
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
    assert_no_nan_metrics(trainer)


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
        trainer = quick_trainer(tmp_path, [monitor], steps=4, accumulate_grad_batches=2)
        trainer.fit(PackedGPT(TINY), _packed_loader())
    assert trainer.global_step == 4
    assert len(cap.matching(r"^ScalingMonitor \(tokens\): cannot count the tokens of a batch of type Packed")) == 1
    assert len(cap.matching(r"^ScalingMonitor \(repetition\): cannot count")) == 1
    assert len(cap.matching(r"^ScalingMonitor \(noise_scale\): cannot count the samples")) == 1
    assert monitor.flops.optimizer_steps == 4 and monitor.flops.total_flops > 0
    assert_no_nan_metrics(trainer)


def test_custom_batch_type_with_tokens_fn_counts_right(tmp_path):
    monitor = ScalingMonitor(tokens_fn=lambda b: b.ids[:, 1:].numel(), unique_tokens=32 * 16.0, noise_scale=False)
    with captured():
        trainer = quick_trainer(tmp_path, [monitor], steps=4)
        trainer.fit(PackedGPT(TINY), _packed_loader())
    assert monitor.tokens.tokens == 4 * 4 * 16
    assert monitor.repetition.summary()["epochs"] == pytest.approx(0.5)


def test_tokens_fn_that_raises_warns_once_and_training_continues(tmp_path):
    def broken(batch):
        raise KeyError("input_ids")

    monitor = ScalingMonitor(tokens_fn=broken, noise_scale=False)
    with captured(allow_internal=True) as cap:  # the user's tokens_fn raised, not our code
        trainer = quick_trainer(tmp_path, [monitor], steps=3)
        trainer.fit(GPTLightningModule(TINY), DataLoader(_data(32), batch_size=4))
    assert trainer.global_step == 3
    assert monitor.flops.optimizer_steps == 3
    assert len(cap.matching("^ScalingMonitor \\(tokens\\): tokens_fn raised KeyError")) == 1
    assert len(cap.matching("^ScalingMonitor \\(repetition\\): cannot count")) == 1


# ------------------------------------------------------------------------------------- faults: trainer configurations


def test_logger_less_trainer_writes_report_to_default_root_dir(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    with captured():
        trainer = quick_trainer(tmp_path, [monitor], steps=2, logger=False)
        trainer.fit(GPTLightningModule(TINY), DataLoader(_data(32), batch_size=4))
    report = json.loads((tmp_path / "scaling_report.json").read_text(), parse_constant=_refuse)
    assert report["tokens"]["training_tokens"] == 2 * 4 * 16
    assert float(trainer.callback_metrics["scaling/tokens"]) == 2 * 4 * 16


def test_csv_logger_gets_the_metrics_and_the_report(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    logger = CSVLogger(tmp_path, name="run")
    with captured():
        trainer = quick_trainer(tmp_path, [monitor], steps=3, logger=logger, log_every_n_steps=1)
        trainer.fit(GPTLightningModule(TINY), DataLoader(_data(32), batch_size=4))
    metrics = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "scaling/tokens" in metrics and "scaling/flops" in metrics
    report = json.loads((tmp_path / "run" / "version_0" / "scaling_report.json").read_text())
    assert report["compute"]["optimizer_steps"] == 3


def test_fast_dev_run_counts_its_one_batch(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    with captured():
        trainer = L.Trainer(
            callbacks=[monitor],
            fast_dev_run=True,
            default_root_dir=tmp_path,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(GPTLightningModule(TINY), DataLoader(_data(32), batch_size=4), DataLoader(_data(8), batch_size=4))
    assert trainer.global_step == 1
    assert monitor.tokens.tokens == 4 * 16 and monitor.tokens.optimizer_steps == 1
    assert monitor.flops.optimizer_steps == 1 and monitor.flops.total_flops > 0
    assert monitor.repetition.summary()["tokens"] == 4 * 16


def test_validation_only_run_is_silent_and_counts_nothing(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    with captured() as cap:
        trainer = quick_trainer(tmp_path, [monitor], limit_val_batches=None)
        trainer.validate(GPTLightningModule(TINY), DataLoader(_data(8), batch_size=4))
    assert cap.all == []
    assert monitor.tokens.tokens == 0 and monitor.flops.total_flops == 0
    assert monitor.repetition.summary()["tokens"] == 0
    assert not (tmp_path / "scaling_report.json").exists()


def test_predict_only_run_is_silent_and_counts_nothing(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    with captured() as cap:
        trainer = quick_trainer(tmp_path, [monitor])
        out = trainer.predict(GPTLightningModule(TINY), DataLoader(_data(8)[:, :-1], batch_size=4))
    assert len(out) == 2
    assert cap.all == []
    assert monitor.tokens.tokens == 0 and monitor.flops.total_flops == 0


def test_validate_then_fit_with_the_same_monitor(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    module = GPTLightningModule(TINY)
    with captured():
        trainer = quick_trainer(tmp_path, [monitor], steps=2, limit_val_batches=None)
        trainer.validate(module, DataLoader(_data(8), batch_size=4))
        trainer.fit(module, DataLoader(_data(32), batch_size=4))
    assert monitor.tokens.tokens == 2 * 4 * 16 and monitor.flops.optimizer_steps == 2


def test_epoch_bounded_run_max_steps_minus_one(tmp_path):
    monitor = ScalingMonitor(tokens_fn=target_tokens)
    with captured():
        trainer = quick_trainer(tmp_path, [monitor], steps=-1, max_epochs=1)
        trainer.fit(GPTLightningModule(TINY), DataLoader(_data(32), batch_size=4))
    assert trainer.global_step == 8
    assert monitor.tokens.tokens == 32 * 16
    rep = monitor.repetition.summary()
    assert rep["epochs"] == pytest.approx(1.0) and rep["projected_epochs"] == pytest.approx(1.0)
    assert monitor.tokens.projected_tokens == pytest.approx(32 * 16)
    assert_no_nan_metrics(trainer)


def test_epoch_ending_mid_accumulation_counts_every_micro_batch(tmp_path):
    # 3 batches, accumulation 2: Lightning steps after batch 1 and again at the end of the epoch (batch 2)
    monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale={"warmup_steps": 0})
    with captured():
        trainer = quick_trainer(
            tmp_path, [monitor], steps=-1, max_epochs=1, limit_train_batches=3, accumulate_grad_batches=2
        )
        trainer.fit(GPTLightningModule(TINY), DataLoader(_data(32), batch_size=4))
    assert trainer.global_step == 2
    assert monitor.tokens.tokens == 3 * 4 * 16
    assert monitor.repetition.summary()["tokens"] == 3 * 4 * 16
    per_batch = next(iter(monitor.flops._shapes.exact.values()))[0]
    assert monitor.flops.total_flops == 3 * per_batch
    assert_no_nan_metrics(trainer)


# ---------------------------------------------------------------------------------------------- constructor arguments


NAN, INF = math.nan, math.inf


BAD_ARGUMENTS = {  # every constructor argument, with values that must be refused with a ValueError naming it
    "tokens_fn": [3],
    "law": ["no-such-law", 3],
    "causal_attention": ["quarter"],
    "peak_flops": [-1, NAN],
    "unique_tokens": [0, INF],
    "inference_tokens": [-1],
    "flops": ["yes", 1, {"no_such_option": 1}],
    "tokens": ["yes", {"window": 3}],
    "noise_scale": ["yes", {"every_n_steps": 25}],
    "repetition": [0, {"sketch": "yes"}],
    "report": ["no", 1, None],
    "print_report": ["no", 1, None],
}


@pytest.mark.parametrize(
    "argument, value", [(arg, value) for arg, values in BAD_ARGUMENTS.items() for value in values], ids=repr
)
def test_bad_argument_is_a_value_error_naming_it(argument, value):
    assert_rejected_by_name(ScalingMonitor, argument, value)


def test_every_constructor_argument_is_listed():
    assert_every_constructor_argument_listed(ScalingMonitor, BAD_ARGUMENTS)


@pytest.mark.parametrize("part", ["flops", "tokens", "noise_scale", "repetition"])
def test_scaling_monitor_rejects_unknown_part_options_with_value_error(part):
    with pytest.raises(ValueError, match=part):
        ScalingMonitor(**{part: {"no_such_option": 1}})


@FUZZ
@given(
    part=st.sampled_from(["flops", "tokens", "noise_scale", "repetition"]),
    value=st.one_of(st.sampled_from([None, 0, 1, "yes", [], (), 2.5]), st.text(max_size=3)),
)
def test_scaling_monitor_part_switch_rejects_non_bool_non_dict(part, value):
    with pytest.raises(ValueError, match=part):
        ScalingMonitor(**{part: value})
