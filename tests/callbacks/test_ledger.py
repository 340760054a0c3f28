"""The step ledger the callbacks share (lightning_scaling.callbacks._ledger and _base): duplicate parts,
manual optimization returning a vector, and a fit retried after an exception starting clean books."""

from __future__ import annotations

import warnings

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


def test_a_second_instance_of_a_part_is_switched_off_not_double_counted(tmp_path):
    alone = ScalingMonitor(report=False)
    _quiet_fit(
        quick_trainer(tmp_path / "a", [alone], steps=3), GPTLightningModule(CFG), DataLoader(_rows(), batch_size=4)
    )
    monitor, extra = ScalingMonitor(report=False), FlopCounter()
    with pytest.warns(UserWarning, match="another FlopCounter is already on this Trainer"):
        quick_trainer(tmp_path / "b", [monitor, extra], steps=3).fit(
            GPTLightningModule(CFG), DataLoader(_rows(), batch_size=4)
        )
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
