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
