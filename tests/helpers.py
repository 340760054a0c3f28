"""What the end-to-end callback tests share: a tiny GPT, its batches and a quiet CPU Trainer."""

from __future__ import annotations

import lightning as L
import torch
from gpt import GPTConfig

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
