"""What the end-to-end callback tests share: a tiny GPT, its batches, a quiet CPU Trainer, and the closed-form
linear regression on which the gradient noise scale is known exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from gpt import GPTConfig
from torch.utils.data import DataLoader, TensorDataset

TINY = GPTConfig(n_layer=1, d_model=32, n_head=2, seq_len=16, d_ff=64)
SEQ = TINY.seq_len + 1  # a batch row is seq_len inputs plus the next-byte target


def target_tokens(batch: torch.Tensor) -> int:
    """Training tokens of a [B, seq_len + 1] batch: the seq_len predicted bytes of each row."""
    return batch[:, 1:].numel()


def token_rows(n: int = 64, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    """``n`` rows of ``seq`` random byte ids, the same for every call with the same seed."""
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def quick_trainer(tmp_path, callbacks, steps: int = 4, **kwargs) -> L.Trainer:
    """A CPU Trainer with no logger, checkpoints, progress bar, summary or validation unless asked for."""
    opts = dict(
        max_steps=steps, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, accelerator="cpu", devices=1,
    )
    opts.update(kwargs)
    return L.Trainer(callbacks=callbacks, **opts)


def hf_padded_batches(n: int = 16) -> list[dict[str, torch.Tensor]]:
    """``n`` right-padded batches of 4 (attention mask, labels -100 at the padding), lengths cycling 12-24."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(1, 128, (4, (12, 16, 20, 24)[i % 4]), generator=g)
        mask = torch.ones_like(ids)
        mask[1:, ids.shape[1] // 2:] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask,
                    "labels": (ids * mask).masked_fill(mask == 0, -100)})
    return out


class HFLlamaModule(L.LightningModule):
    """A Hugging Face LlamaForCausalLM from a tiny config (random init, nothing downloaded)."""

    def __init__(self) -> None:
        import transformers

        super().__init__()
        torch.manual_seed(0)
        self.model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64))

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# the closed-form problem of McCandlish et al. 2018, App. A: x ~ N(0, I_d), y = xᵀw* + σε, loss ½(xᵀw − y)², with
# w = w* + δ; lr = 0 freezes w, so B_simple stays d + 1 + dσ²/|δ|²
REGRESSION_DIM = 16
TRUE_B_SIMPLE = REGRESSION_DIM + 1 + REGRESSION_DIM * 1.0**2 / 1.0**2  # σ = 1, |δ| = 1: 33 samples


class ClosedFormRegression(L.LightningModule):
    """½(xᵀw − y)² started at w = w* + e₀; ``scheduler`` builds an LR scheduler for the SGD optimizer (per step)."""

    def __init__(self, lr: float = 0.0, scheduler: Callable[[torch.optim.Optimizer], Any] | None = None) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(REGRESSION_DIM, 1, bias=False)
        w_star = torch.linspace(-1, 1, REGRESSION_DIM)
        delta = torch.zeros(REGRESSION_DIM)
        delta[0] = 1.0
        with torch.no_grad():
            self.lin.weight.copy_((w_star + delta)[None])
        self.register_buffer("w_star", w_star)
        self.lr = lr
        self.scheduler = scheduler

    def loss_of(self, batch: Any) -> torch.Tensor:
        """The micro-batch's mean loss (in fp32, also under a 16-bit autocast)."""
        x, eps = batch
        return 0.5 * (self.lin(x).squeeze(-1).float() - (x @ self.w_star + eps)).pow(2).mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss_of(batch)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}


def regression_data(rows: int, micro: int, seed: int = 0, sigma: float = 1.0) -> DataLoader:
    """``rows`` samples of the regression in micro-batches of ``micro`` (in order, the last partial one dropped)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, REGRESSION_DIM, generator=gen)
    eps = sigma * torch.randn(rows, generator=gen)
    return DataLoader(TensorDataset(x, eps), batch_size=micro, shuffle=False, drop_last=True)
