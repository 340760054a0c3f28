"""DataRepetition: exact epochs (map-style, pre-batched, accumulation, 2-process DDP, resume), the sketch on a
stream, the projection warnings at the right step, once each, and its constructor arguments."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from gpt import GPTLightningModule
from helpers import (
    FUZZ,
    TINY,
    assert_every_constructor_argument_listed,
    assert_rejected_by_name,
    assert_rejected_by_name_or_stored_finite,
    captured,
    quick_trainer,
    target_tokens,
    token_rows,
    weird_numbers,
)
from hypothesis import given
from hypothesis import strategies as st
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_scaling.callbacks import ScalingMonitor
from lightning_scaling.callbacks.data_repetition import DataRepetition
from lightning_scaling.laws.definitions import DataConstrainedLaw

SEQ = 8


VOCAB = 32


def _rows(n: int) -> torch.Tensor:
    """n distinct samples of SEQ token ids (row i is its index written in base VOCAB, then padding)."""
    digits = torch.arange(n).unsqueeze(1) // VOCAB ** torch.arange(SEQ) % VOCAB
    return digits.to(torch.int64)


class Samples(Dataset):
    def __init__(self, n: int) -> None:
        self.rows = _rows(n)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


class MaskedSamples(Samples):
    """Dict samples with an attention mask: sample i has 4 + i % 5 real tokens (mean 6 over 5k samples)."""

    def __getitem__(self, i: int) -> dict:
        mask = (torch.arange(SEQ) < 4 + i % 5).long()
        return {"input_ids": self.rows[i] * mask, "attention_mask": mask}


class ShuffledStream(IterableDataset):
    """The same n samples, shuffled afresh on each of `passes` passes; no __len__."""

    def __init__(self, n: int, passes: int) -> None:
        self.rows, self.passes = _rows(n), passes

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(self.passes):
            yield from self.rows[torch.randperm(len(self.rows), generator=g)]


class TinyLM(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.out = nn.Linear(4, VOCAB)

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        return nn.functional.cross_entropy(self.out(self.emb(ids)).flatten(0, 1), ids.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class DumpState(Callback):
    """Writes each rank's DataRepetition state and summary to tmp_path (ddp_spawn runs in child processes)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        rep = next(c for c in trainer.callbacks if isinstance(c, DataRepetition))
        state = rep.state_dict()
        state["registers"] = None if state["registers"] is None else state["registers"].tolist()
        out = {"state": state, "summary": rep.summary()}
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


def _fit(callback, data, batch_size=10, stop=None, ckpt_path=None, **trainer_kwargs) -> Trainer:
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    callbacks = [callback] + ([StopAt(stop)] if stop else []) + trainer_kwargs.pop("callbacks", [])
    trainer = Trainer(
        accelerator="cpu",
        devices=trainer_kwargs.pop("devices", 1),
        logger=False,
        enable_checkpointing=trainer_kwargs.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(TinyLM(), loader, ckpt_path=ckpt_path)
    return trainer


def _messages(record, text: str) -> list[str]:
    return [str(w.message) for w in record if "DataRepetition" in str(w.message) and text in str(w.message)]


def test_map_style_repeated_20_times_is_20_epochs_and_warns_past_16(recwarn):
    # 1,000 samples, 20 epochs of 20 steps × 50 samples: the whole run (400 steps) is known from step 1.
    rep = DataRepetition(stop_epochs=16.0)
    _fit(rep, Samples(1000), batch_size=50, max_epochs=20)
    law = DataConstrainedLaw()
    unique = 1000 * SEQ
    assert rep.samples == 20_000 and rep.tokens == 20_000 * SEQ
    assert rep.epochs == pytest.approx(20.0, rel=1e-12)
    assert rep.projected_epochs == pytest.approx(20.0, rel=1e-12)
    assert rep.unique_tokens == pytest.approx(unique)
    assert rep.effective_tokens == pytest.approx(law.effective_tokens(20 * unique, unique))
    assert rep.effective_tokens / unique == pytest.approx(1 + 15.387756 * (1 - math.exp(-19 / 15.387756)), rel=1e-6)
    assert rep.repetition_value == pytest.approx(math.exp(-19 / 15.387756), rel=1e-6)
    params = sum(p.numel() for p in TinyLM().parameters())
    assert rep.effective_tokens_per_param == pytest.approx(rep.effective_tokens / params)
    # crossed 4 and 16 at the first optimizer step; one warning shown: the stronger one, with advice
    assert rep.warned == {"warn": 1, "stop": 1}
    stop = _messages(recwarn, "past 16 epochs")
    assert len(stop) == 1 and "20.0 epochs" in stop[0] and "data-constrained optimum" in stop[0]
    assert _messages(recwarn, "past 4 epochs") == []
    assert rep.distinct_fraction is None  # sketch auto: off for a dataset with a length


def test_default_thresholds_state_the_value_of_repeats_and_the_headroom(recwarn):
    # 20 epochs: past the default 4 (diminishing returns), not past the default 40 (worthless). The message
    # gives the value of the next repeated token, exp(-19/R*_D) = 29%, and how far D' can still grow:
    # U(1 + R*_D) / D' - 1 = 38% (Muennighoff et al. 2023, eq. 5).
    rep = DataRepetition()
    _fit(rep, Samples(1000), batch_size=50, max_epochs=20)
    assert rep.warned == {"warn": 1}
    (message,) = _messages(recwarn, "past 4 epochs")
    assert "worth 29% of a fresh one" in message and "by at most 38%" in message
    assert _messages(recwarn, "past 40 epochs") == []


def test_stream_without_length_detected_as_repeated_by_the_sketch(recwarn):
    # The same 1,000 samples shuffled 20 times, as an IterableDataset with no length.
    rep = DataRepetition(sketch_every_n_steps=5, stop_epochs=16.0)
    _fit(rep, ShuffledStream(1000, 20), batch_size=50, max_steps=400)
    assert rep.sketch_on
    assert rep.samples == 20_000
    assert rep.distinct == pytest.approx(1000, rel=0.02)
    assert rep.distinct_fraction == pytest.approx(1 / 20, rel=0.02)
    assert rep.epochs == pytest.approx(20.0, rel=0.02)
    assert rep.projected_epochs == pytest.approx(20.0, rel=0.02)
    # The stream cycles after 1,000 samples (step 20); the first estimate after that (step 25, estimates
    # every 5 steps) finds no new distinct samples, so the projection jumps from 1 to 20 epochs there.
    assert rep.warned == {"warn": 25, "stop": 25}
    assert len(_messages(recwarn, "past 16 epochs")) == 1
    assert _messages(recwarn, "past 4 epochs") == []


def test_fresh_stream_is_one_epoch_and_never_warns(recwarn):
    rep = DataRepetition(sketch_every_n_steps=5)
    _fit(rep, ShuffledStream(20_000, 1), batch_size=50, max_steps=400)
    assert rep.distinct_fraction == pytest.approx(1.0, abs=0.02)
    assert rep.epochs == pytest.approx(1.0, abs=0.02)
    assert rep.projected_epochs < 1.1
    assert rep.warned == {}
    assert _messages(recwarn, "epochs") == []


@pytest.mark.parametrize("accumulate", [1, 2])
def test_warnings_fire_at_the_step_the_epochs_cross_once_each(recwarn, accumulate):
    # No known end (max_steps = max_epochs = -1): the projection is the epochs so far, so the warnings fire
    # when epochs first exceed 4 and 16. 100 samples, batches of 10: micro-batch 41 takes us past 4 epochs.
    rep = DataRepetition(stop_epochs=16.0)
    stop_step = 170 // accumulate
    _fit(rep, Samples(100), max_epochs=-1, max_steps=-1, stop=stop_step, accumulate_grad_batches=accumulate)
    assert rep.global_steps == stop_step
    assert rep.epochs == pytest.approx(stop_step * accumulate / 10)
    first_past = lambda epochs: math.floor(epochs * 10 / accumulate) + 1
    assert rep.warned == {"warn": first_past(4), "stop": first_past(16)}
    assert len(_messages(recwarn, "past 4 epochs")) == 1
    assert len(_messages(recwarn, "past 16 epochs")) == 1


def test_attention_mask_tokens_and_duplicates_inside_a_map_style_dataset():
    # sketch=True on a map-style dataset whose second half duplicates the first: epochs count samples over
    # len(dataset); distinct_fraction reveals that only half the samples are distinct.
    data = MaskedSamples(2000)
    data.rows[1000:] = data.rows[:1000]
    rep = DataRepetition(sketch=True, sketch_every_n_steps=1)
    _fit(rep, data, batch_size=100, max_epochs=2)
    assert rep.tokens == 2 * 2000 * 6  # non-padding tokens only
    assert rep.unique_tokens == pytest.approx(2000 * 6)
    assert rep.epochs == pytest.approx(2.0)
    assert rep.distinct == pytest.approx(1000, rel=0.02)
    assert rep.distinct_fraction == pytest.approx(0.25, rel=0.02)


def test_unique_tokens_from_the_user_win():
    rep = DataRepetition(unique_tokens=400 * SEQ, params=1e6)
    _fit(rep, Samples(100), max_epochs=2)  # 200 samples of a corpus of 400
    assert rep.epochs == pytest.approx(0.5)
    assert rep.repetition_value == 1.0 and rep.effective_tokens == pytest.approx(200 * SEQ)
    assert rep.effective_tokens_per_param == pytest.approx(200 * SEQ / 1e6)


def test_resume_continues_exactly(tmp_path):
    # An uninterrupted run of 25 steps (accumulation 2) checkpoints at step 7 (mid-epoch); a new Trainer
    # resumes from that checkpoint: the same final counters, sketch and warning steps.
    from lightning.pytorch.callbacks import ModelCheckpoint

    def make():
        return DataRepetition(sketch=True, sketch_every_n_steps=3, warn_epochs=2.0, stop_epochs=4.0)

    kwargs = dict(accumulate_grad_batches=2, max_epochs=-1, max_steps=25)
    full = make()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1)
    _fit(full, Samples(100), enable_checkpointing=True, callbacks=[saver], **kwargs)
    (ckpt,) = tmp_path.glob("*step=7.ckpt")
    resumed = make()
    _fit(resumed, Samples(100), ckpt_path=str(ckpt), **kwargs)

    a, b = full.state_dict(), resumed.state_dict()
    assert torch.equal(a.pop("registers"), b.pop("registers"))
    assert a == b
    assert a["tokens"] == 25 * 2 * 10 * SEQ and a["global_steps"] == 25
    assert a["warned"] == {"warn": 1, "stop": 1}  # the plan (5 epochs) was known from step 1
    assert full.summary() == resumed.summary()
    assert resumed.epochs == pytest.approx(5.0)


@pytest.mark.slow
def test_ddp_two_processes_global_counts(tmp_path):
    # 2 ranks × batches of 4 × accumulation 2, 64 samples, 3 epochs: DistributedSampler gives each rank half
    # an epoch; the counters are global and identical on both ranks.
    rep = DataRepetition(sketch=True, sketch_every_n_steps=2)
    trainer = _fit(
        rep,
        Samples(64),
        batch_size=4,
        devices=2,
        strategy="ddp_spawn",
        max_epochs=3,
        accumulate_grad_batches=2,
        callbacks=[DumpState(str(tmp_path))],
    )
    assert trainer.callback_metrics["scaling/epochs"].item() == pytest.approx(3.0)
    assert trainer.callback_metrics["scaling/projected_epochs"].item() == pytest.approx(3.0)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    state, summary = ranks[0]["state"], ranks[0]["summary"]
    assert state["samples"] == 3 * 64 and state["tokens"] == 3 * 64 * SEQ
    assert state["global_steps"] == 3 * 64 // (2 * 4 * 2)
    assert summary["epochs"] == pytest.approx(3.0)
    assert summary["distinct_samples"] == pytest.approx(64, rel=0.01)  # registers merged over ranks
    assert summary["distinct_fraction"] == pytest.approx(1 / 3, rel=0.01)


def test_bookkeeping_failure_warns_and_training_continues(recwarn):
    # A batch we cannot count (floats, no tokens_fn): one warning, switched off, the run completes.
    class Floats(Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return torch.randn(SEQ)

    class FloatModel(TinyLM):
        def training_step(self, batch, batch_idx):
            return self.out.weight.sum() * batch.sum() * 0

    rep = DataRepetition()
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=2,
        callbacks=[rep],
    )
    trainer.fit(FloatModel(), DataLoader(Floats(), batch_size=5))
    assert trainer.global_step == 8
    assert not rep.enabled and rep.epochs is None
    assert len(_messages(recwarn, "cannot count the tokens")) == 1


class BrokenLaw:
    """Looks like a DataConstrainedLaw but fails: our bookkeeping error must not stop the user's run."""

    def effective_tokens(self, tokens, unique_tokens):
        raise RuntimeError("boom")

    repetition_value = compute_optimal = effective_tokens


def test_internal_error_warns_once_and_training_continues(recwarn):
    rep = DataRepetition(law=BrokenLaw())
    trainer = _fit(rep, Samples(40), max_epochs=3)
    assert trainer.global_step == 12
    assert not rep.enabled
    switched_off = _messages(recwarn, "switched off after an error")
    assert len(switched_off) == 1 and "boom" in switched_off[0]


def test_messages_through_the_monitor_name_its_arguments(recwarn):
    from lightning_scaling import ScalingWarning
    from lightning_scaling.callbacks import ScalingMonitor

    monitor = ScalingMonitor(flops=False, tokens=False, noise_scale=False, repetition={"sketch": False}, report=False)
    _fit(monitor, ShuffledStream(100, 1), batch_size=10, max_steps=2)
    (warning,) = [w for w in recwarn if "epochs are unknown" in str(w.message)]
    assert warning.category is ScalingWarning and warning.filename == "lightning_scaling"
    assert str(warning.message) == (
        "ScalingMonitor (repetition): the training data has no length and the sketch is off, so epochs are "
        'unknown; pass ScalingMonitor(unique_tokens=...) or ScalingMonitor(repetition={"sketch": True}).'
    )
    alone = DataRepetition()
    assert alone.option_hint("sketch", "True") == "DataRepetition(sketch=True)"


def test_pre_batched_loader_epochs_count_rows_not_batches(tmp_path):
    # DataLoader(batch_size=None) over a list of ready-made batches: len(dataset) is the number of BATCHES
    # (8 of 4 rows), so "len(dataset) x tokens per sample" is 4x too small and the epochs 4x too large.
    data = token_rows(32)
    batches = list(data.split(4))
    monitor = ScalingMonitor(tokens_fn=target_tokens, noise_scale=False)
    with captured():
        trainer = quick_trainer(tmp_path, [monitor], steps=4)
        trainer.fit(GPTLightningModule(TINY), DataLoader(batches, batch_size=None))
    rows_seen, rows_total = 4 * 4, 32
    assert monitor.repetition.summary()["epochs"] == pytest.approx(rows_seen / rows_total, rel=0.05)


# ---------------------------------------------------------------------------------------------- constructor arguments


NAN, INF = math.nan, math.inf


BAD_ARGUMENTS = {  # every constructor argument, with values that must be refused with a ValueError naming it
    "unique_tokens": [0, -1, NAN, INF, "1e9", True],
    "tokens_fn": [3, "input_ids"],
    "sketch": ["yes", 1, 0.5],
    "sketch_precision": [3, 19, 14.5, "14", True],
    "warn_epochs": [0, -4, NAN, INF, "4", True],
    "stop_epochs": [0, NAN, INF, "40", True, 3.0],  # 3.0: below warn_epochs
    "law": [3, "muennighoff"],
    "params": [0, -1, NAN, INF, "1e6", True],
    "sketch_every_n_steps": [0, -1, 2.5, "5", True],
}


@pytest.mark.parametrize(
    "argument, value", [(arg, value) for arg, values in BAD_ARGUMENTS.items() for value in values], ids=repr
)
def test_bad_argument_is_a_value_error_naming_it(argument, value):
    assert_rejected_by_name(DataRepetition, argument, value)


def test_every_constructor_argument_is_listed():
    assert_every_constructor_argument_listed(DataRepetition, BAD_ARGUMENTS)


@FUZZ
@given(
    argument=st.sampled_from(
        [
            "unique_tokens",
            "tokens_fn",
            "sketch",
            "sketch_precision",
            "warn_epochs",
            "stop_epochs",
            "params",
            "sketch_every_n_steps",
        ]
    ),
    value=weird_numbers,
)
def test_weird_numbers_are_rejected_by_name_or_stored_finite(argument, value):
    assert_rejected_by_name_or_stored_finite(DataRepetition, argument, value)
