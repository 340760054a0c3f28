"""A small GPT (byte-level, SwiGLU MLP, tied embeddings) and an embedded corpus: the Python standard
library's own source, which every machine with Python has. Used by ``train_gpt.py``, the tests and the
benchmarks. No downloads."""

from __future__ import annotations

import math
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


@dataclass
class GPTConfig:
    """Model shape. Field names are the ones ``FlopCounter`` reads for the analytic FLOP count."""

    vocab_size: int = 256
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    gated_mlp: bool = True
    tied_embeddings: bool = True
    dropout: float = 0.0


def kernels_available() -> bool:
    """Our Triton kernels run on CUDA only (the CPU uses the PyTorch path)."""
    if not torch.cuda.is_available():
        return False
    try:
        from lightning_scaling.kernels.modules import FusedSelfAttention, FusedSwiGLU  # noqa: F401
    except Exception:  # noqa: BLE001 - kernels are optional
        return False
    return True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, use_kernels: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        if use_kernels:
            from lightning_scaling.kernels.modules import FusedSelfAttention, FusedSwiGLU

            self.attn = FusedSelfAttention(cfg.d_model, cfg.n_head, causal=True)
            self.mlp = FusedSwiGLU(cfg.d_model, cfg.d_ff)
        else:
            self.attn = CausalSelfAttention(cfg)
            self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, use_kernels: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, use_kernels) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied_embeddings:
            self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        s = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(s, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class GPTLightningModule(L.LightningModule):
    """Next-byte prediction. ``self.config`` carries the shape for the analytic FLOP count."""

    def __init__(
        self, config: GPTConfig | None = None, lr: float = 3e-3, warmup_steps: int = 50, use_kernels: bool | None = None
    ) -> None:
        super().__init__()
        self.config = config or GPTConfig()
        self.save_hyperparameters({"config": asdict(self.config), "lr": lr, "warmup_steps": warmup_steps})
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.model = GPT(self.config, use_kernels=kernels_available() if use_kernels is None else use_kernels)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1, betas=(0.9, 0.95))
        total = max(self.trainer.estimated_stepping_batches, self.warmup_steps + 1)

        def schedule(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def stdlib_corpus(max_bytes: int = 4_000_000) -> bytes:
    """Bytes of the Python standard library's ``.py`` files, in sorted path order, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no Python source found under {root}")
    return b"".join(chunks)[:max_bytes]


class ByteChunks(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` bytes (inputs and next-byte targets)."""

    def __init__(self, data: bytes, seq_len: int) -> None:
        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.seq_len = seq_len
        self.n = (len(self.tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]


def make_dataloaders(
    seq_len: int, batch_size: int, max_bytes: int = 4_000_000, val_fraction: float = 0.02, num_workers: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders over the embedded corpus (the validation split is the tail)."""
    data = stdlib_corpus(max_bytes)
    split = int(len(data) * (1 - val_fraction))
    train = ByteChunks(data[:split], seq_len)
    val = ByteChunks(data[split:], seq_len)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers),
        DataLoader(val, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers),
    )
