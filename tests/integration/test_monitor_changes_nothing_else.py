"""The first promise: adding ScalingMonitor changes nothing else.

``training_step`` runs exactly once per batch; weights, logged losses, metrics and the random state are
bit-identical to the same run without the monitor; ``None`` from ``training_step`` is handled on any batch; the
parts read the device back once per optimizer step at most. (FLOPs of pad-to-longest batches, measured on a few
shapes and predicted for the rest within 1% of measuring every step: tests/callbacks/test_flop_counter.py.)"""

from __future__ import annotations

import random
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from gpt import GPTConfig, GPTLightningModule
from helpers import quick_trainer
from lightning.pytorch.loggers import Logger
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

from lightning_scaling.callbacks import ScalingMonitor

CFG = GPTConfig(n_layer=1, d_model=32, n_head=2, seq_len=16, d_ff=64, dropout=0.1)


class MemoryLogger(Logger):
    """Keeps every logged metric in memory, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def user_losses(self) -> list[float]:
        return [m["train/loss"] for _, m in self.rows if "train/loss" in m]


class UserModule(GPTLightningModule):
    """What users do in training_step: augment the batch in place, count calls, update a torchmetrics metric,
    draw random numbers (dropout and their own)."""

    def __init__(self) -> None:
        super().__init__(CFG)
        self.calls: list[int] = []
        self.mean_loss = torchmetrics.MeanMetric()

    def training_step(self, batch, batch_idx):
        self.calls.append(batch_idx)
        ids = batch["input_ids"]
        ids.add_(torch.randint(0, 2, ids.shape)).remainder_(256)  # in-place augmentation with the user's RNG
        logits = self(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        self.mean_loss.update(loss.detach())
        self.log("train/loss", loss)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/mean_loss", self.mean_loss.compute())
        self.mean_loss.reset()


def _batches(n: int = 48, seq: int = 17) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": row} for row in torch.randint(0, 256, (n, seq), generator=g)]


def _run(tmp_path, callbacks, module=None, **kwargs):
    L.seed_everything(7, verbose=False)
    module = module or UserModule()
    logger = MemoryLogger()
    data = _batches()
    trainer = quick_trainer(
        tmp_path, callbacks, steps=kwargs.pop("steps", 8), logger=logger, log_every_n_steps=1, **kwargs
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    state = {
        "weights": [p.detach().clone() for p in module.parameters()],
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "losses": logger.user_losses(),
        "mean_loss": float(trainer.callback_metrics["train/mean_loss"]),
        "data": torch.stack([b["input_ids"] for b in data]),
    }
    return module, trainer, state


def test_monitor_at_defaults_changes_nothing(tmp_path):
    plain_module, _, plain = _run(tmp_path / "plain", [])
    monitor = ScalingMonitor()
    module, _, watched = _run(tmp_path / "watched", [monitor])
    assert module.calls == plain_module.calls == list(range(8))  # once per batch, never replayed
    for a, b in zip(watched["weights"], plain["weights"], strict=True):
        assert torch.equal(a, b)  # bit-identical, not merely close
    assert torch.equal(watched["torch_rng"], plain["torch_rng"])
    assert watched["python_rng"] == plain["python_rng"]
    assert np.array_equal(watched["numpy_rng"], plain["numpy_rng"])
    assert watched["losses"] == plain["losses"] and len(plain["losses"]) == 8
    assert watched["mean_loss"] == plain["mean_loss"]
    assert torch.equal(watched["data"], plain["data"])  # the in-place augmentation was applied once per batch
    # and the monitor did its work
    assert monitor.flops.total_flops > 0 and monitor.flops.measured_shapes == 1
    assert monitor.tokens.tokens == 8 * 4 * 17


def test_monitor_with_accumulation_changes_nothing(tmp_path):
    _, _, plain = _run(tmp_path / "plain", [], accumulate_grad_batches=2, steps=4)
    monitor = ScalingMonitor()
    _, _, watched = _run(tmp_path / "watched", [monitor], accumulate_grad_batches=2, steps=4)
    for a, b in zip(watched["weights"], plain["weights"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(watched["torch_rng"], plain["torch_rng"])
    assert watched["losses"] == plain["losses"]
    assert monitor.noise_scale.estimator.count == 4


class SkipsSome(GPTLightningModule):
    """Returns None (Lightning's "skip this batch") on the batches listed."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__(GPTConfig(n_layer=1, d_model=32, n_head=2, seq_len=16, d_ff=64))
        self.skip = skip

    def training_step(self, batch, batch_idx):
        if batch_idx in self.skip:
            return None
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("skip", [{0}, {0, 1, 2}, {3}])
def test_none_from_training_step_is_handled_on_any_batch(tmp_path, skip):
    monitor = ScalingMonitor(noise_scale=False)
    data = torch.randint(0, 256, (32, 17), generator=torch.Generator().manual_seed(0))
    trainer = quick_trainer(tmp_path, [monitor], steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's "training_step returned None" and our undertraining advice
        trainer.fit(SkipsSome(skip), DataLoader(data, batch_size=4))
    trained = 6 - len(skip)
    assert monitor.tokens.tokens == trained * 4 * 17  # skipped batches trained on nothing
    assert monitor.flops.measured_shapes == 1  # the first trained batch was measured, whichever it was
    per_batch = next(iter(monitor.flops._shapes.exact.values()))[0]
    assert monitor.flops.total_flops == trained * per_batch
    assert monitor.flops.optimizer_steps == 6


class _HostReads(TorchFunctionMode):
    """Counts tensor-to-Python conversions (each one waits for the device)."""

    READS = frozenset(
        {
            torch.Tensor.item,
            torch.Tensor.tolist,
            torch.Tensor.__float__,
            torch.Tensor.__int__,
            torch.Tensor.__bool__,
            torch.Tensor.__index__,
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class MaskedGPT(GPTLightningModule):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch["input_ids"], batch_idx)


@pytest.mark.parametrize("with_mask", [False, True])
def test_at_most_one_host_read_per_optimizer_step(tmp_path, with_mask):
    data = torch.randint(0, 256, (48, 17), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, **({"attention_mask": torch.ones_like(r)} if with_mask else {})} for r in data]
    steps, accumulate = 5, 2

    def reads(callbacks):
        trainer = quick_trainer(
            tmp_path, callbacks, steps=steps, accumulate_grad_batches=accumulate, log_every_n_steps=1000
        )
        counter = _HostReads()
        with counter:
            trainer.fit(
                MaskedGPT(GPTConfig(n_layer=1, d_model=32, n_head=2, seq_len=16, d_ff=64)),
                DataLoader(rows, batch_size=4),
            )
        return counter.count

    base = reads([])
    monitor = ScalingMonitor(report=False)
    extra = reads([monitor])
    assert monitor.tokens.tokens == steps * accumulate * 4 * 17
    # at most one per step, plus the pre-flight's look at one sample before training starts
    assert extra - base <= steps + 1, (extra, base)


class RandomCrops(torch.utils.data.Dataset):
    """A dataset that draws from the global RNGs in __getitem__ (random crops), read in the main process."""

    def __init__(self) -> None:
        self.data = torch.randint(0, 256, (64, 40), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i):
        start = int(torch.randint(0, 20, (1,))) + random.randint(0, 1) + int(np.random.randint(0, 2))
        return {"input_ids": self.data[i, start : start + 17].clone()}


def test_our_look_at_the_dataset_draws_nothing_from_the_users_generators(tmp_path):
    """The pre-flight reads a few dataset items; a dataset that draws random numbers must not notice."""

    def run(callbacks):
        L.seed_everything(3, verbose=False)
        module = UserModule()
        trainer = quick_trainer(tmp_path, callbacks, steps=6, logger=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, DataLoader(RandomCrops(), batch_size=4, shuffle=True))
        return [p.detach().clone() for p in module.parameters()], torch.get_rng_state()

    plain, plain_rng = run([])
    watched, watched_rng = run([ScalingMonitor()])
    assert all(torch.equal(a, b) for a, b in zip(watched, plain, strict=True))
    assert torch.equal(watched_rng, plain_rng)
