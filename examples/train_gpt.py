"""Train a small byte-level GPT on the Python standard library's source with every lightning-scaling callback on.

    python examples/train_gpt.py                 # a few minutes on 2 CPU cores (torch's default threads;
                                                 # OMP_NUM_THREADS=1 is faster on a busy machine)
    python examples/train_gpt.py --steps 50      # a quick look
    python examples/train_gpt.py --device cuda   # CUDA, with our Triton kernels when they load

The corpus ships with every Python installation: nothing is downloaded.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from gpt import GPTConfig, GPTLightningModule, kernels_available, make_dataloaders
from lightning.pytorch.loggers import CSVLogger

from lightning_scaling.callbacks import ScalingMonitor


def target_tokens(batch: torch.Tensor) -> int:
    """Training tokens of a batch of [B, seq_len + 1] windows: the seq_len predicted bytes of each."""
    return batch[:, 1:].numel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--corpus-bytes", type=int, default=4_000_000, help="bytes of stdlib source to train on")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--devices", type=int, default=1, help="processes (data-parallel ranks)")
    p.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on CUDA, 32 on CPU)")
    p.add_argument("--no-kernels", action="store_true", help="use PyTorch attention/MLP even on CUDA")
    p.add_argument("--out", default="scaling_runs", help="log directory")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    config = GPTConfig(
        seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, d_ff=4 * args.d_model
    )
    use_kernels = use_cuda and not args.no_kernels and kernels_available()
    model = GPTLightningModule(config, lr=args.lr, warmup_steps=min(50, args.steps // 10 + 1), use_kernels=use_kernels)
    train, val = make_dataloaders(args.seq_len, args.batch_size, max_bytes=args.corpus_bytes)
    # The report is printed below, once the progress bar has finished drawing (it would otherwise print under it).
    monitor = ScalingMonitor(tokens_fn=target_tokens, print_report=False)
    trainer = L.Trainer(
        accelerator="cuda" if use_cuda else "cpu",
        devices=args.devices,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=1.0,
        precision=args.precision or ("bf16-mixed" if use_cuda else "32-true"),
        logger=CSVLogger(args.out, name="train_gpt"),
        callbacks=[monitor],
        log_every_n_steps=10,
        val_check_interval=min(100, args.steps) * args.accumulate,
        limit_val_batches=20,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    print(f"training on {'CUDA' if use_cuda else 'CPU'}; Triton kernels: {'on' if use_kernels else 'off'}")
    trainer.fit(model, train, val)
    if monitor.report_text:
        print("\n" + monitor.report_text)
    return monitor.report or {}


if __name__ == "__main__":
    main()
