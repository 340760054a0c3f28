"""Faults around the step ledger and the in-step FLOP counter: skipped batches, flex attention, duplicate parts,
odd losses, and a fit retried after an exception."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from gpt import GPTConfig, GPTLightningModule
from helpers import quick_trainer
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.data import DataLoader

from lightning_scaling.callbacks import FlopCounter, ScalingMonitor

CFG = GPTConfig(n_layer=1, d_model=32, n_head=2, seq_len=16, d_ff=64)


def _rows(n=32, seq=17, seed=0):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _quiet_fit(trainer, module, loader, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader, **kwargs)


class SkipsFromHook(GPTLightningModule):
    """on_train_batch_start returning -1 makes Lightning skip the rest of the epoch after our hook ran."""

    modes_seen: list[int] = []

    def on_train_batch_start(self, batch, batch_idx):
        return -1 if batch_idx == 2 else None

    def training_step(self, batch, batch_idx):
        self.modes_seen.append(len(_get_current_dispatch_mode_stack()))
        return super().training_step(batch, batch_idx)


def test_a_batch_skipped_by_on_train_batch_start_leaves_no_counter_open(tmp_path):
    batches = [_rows(4, 9), _rows(4, 13), _rows(4, 17), _rows(4, 11)]  # a new shape every batch
    module = SkipsFromHook(CFG)
    counter = FlopCounter()
    _quiet_fit(quick_trainer(tmp_path, [counter], steps=-1, max_epochs=2), module, DataLoader(batches, batch_size=None))
    assert _get_current_dispatch_mode_stack() == []  # nothing outlives the fit
    assert max(module.modes_seen) <= 1  # never two counters stacked
    assert counter.optimizer_steps == 4  # batches 0 and 1 of each epoch


def test_flex_attention_called_directly_is_counted_not_broken(tmp_path):
    flex = pytest.importorskip("torch.nn.attention.flex_attention", reason="this torch has no flex attention")

    class FlexGPT(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb, self.qkv, self.out = torch.nn.Embedding(256, 32), torch.nn.Linear(32, 96), torch.nn.Linear(32, 256)

        def training_step(self, batch, batch_idx):
            x = self.emb(batch[:, :-1])
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
            # flex attention has no CPU backward in torch 2.13: its inputs are detached here, the rest trains
            y = flex.flex_attention(q.detach(), k.detach(), v.detach()).transpose(1, 2).reshape(x.shape)
            logits = self.out(y)
            return F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    counter = FlopCounter()
    trainer = quick_trainer(tmp_path, [counter], steps=2)
    _quiet_fit(trainer, FlexGPT(), DataLoader(_rows(), batch_size=4))
    assert trainer.global_step == 2 and counter.total_flops > 0


def test_a_second_instance_of_a_part_is_switched_off_not_double_counted(tmp_path):
    alone = ScalingMonitor(report=False)
    _quiet_fit(quick_trainer(tmp_path / "a", [alone], steps=3), GPTLightningModule(CFG), DataLoader(_rows(), batch_size=4))
    monitor, extra = ScalingMonitor(report=False), FlopCounter()
    with pytest.warns(UserWarning, match="another FlopCounter is already on this Trainer"):
        quick_trainer(tmp_path / "b", [monitor, extra], steps=3).fit(GPTLightningModule(CFG),
                                                                     DataLoader(_rows(), batch_size=4))
    assert monitor.flops.total_flops == alone.flops.total_flops and not extra.enabled


class ManualVectorLoss(GPTLightningModule):
    def __init__(self):
        super().__init__(CFG)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        logits = self(batch[:, :-1])
        per_row = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(dim=1)
        opt.zero_grad()
        self.manual_backward(per_row.mean())
        opt.step()
        return per_row.detach()  # Lightning hands any tensor back as the "loss"


def test_manual_optimization_returning_a_vector_does_not_break_the_books(tmp_path):
    monitor = ScalingMonitor(report=False)
    trainer = quick_trainer(tmp_path, [monitor], steps=3)
    _quiet_fit(trainer, ManualVectorLoss(), DataLoader(_rows(), batch_size=4))
    assert trainer.global_step == 3
    assert monitor.tokens.enabled and monitor.tokens.tokens == 3 * 4 * 17
    assert monitor.flops.enabled and monitor.flops.total_flops > 0


class FailsOnce(GPTLightningModule):
    fail_at: int | None = 5

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            FailsOnce.fail_at = None
            raise RuntimeError("the user's step failed")
        return super().training_step(batch, batch_idx)


def test_a_fit_retried_after_an_exception_starts_clean_books(tmp_path):
    module = FailsOnce(CFG)
    monitor = ScalingMonitor(report=False)
    trainer = quick_trainer(tmp_path, [monitor], steps=4, accumulate_grad_batches=2)
    with pytest.raises(RuntimeError, match="the user's step failed"):
        _quiet_fit(trainer, module, DataLoader(_rows(), batch_size=4))
    assert monitor.noise_scale._handles == []  # no gradient hook left on the user's parameters
    assert _get_current_dispatch_mode_stack() == []
    retry = ScalingMonitor(report=False)
    trainer = quick_trainer(tmp_path, [retry], steps=4, accumulate_grad_batches=2)
    _quiet_fit(trainer, module, DataLoader(_rows(), batch_size=4))
    assert retry.tokens.tokens == 4 * 2 * 4 * 17
