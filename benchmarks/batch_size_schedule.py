"""BatchSizeSchedule, measured: the example GPT trained on the same number of tokens with a fixed small global batch,
a fixed large one, and the batch the schedule sets from the measured gradient noise scale.

The model is the example's GPT at a smaller default shape (2 layers, d_model 96, sequences of 64 bytes; the flags
set any other) so that the four runs fit in about five minutes on two shared CPU cores. Every run starts from the
same weights and reads the same micro-batches in the same order (the embedded corpus: the Python standard
library's source, nothing downloaded), one epoch over ``--micro-batches`` micro-batches of ``--micro-batch``
sequences, so the runs differ only in how many micro-batches make an optimizer step. The batch is raised through
gradient accumulation, so on one device every run does the same forward and backward FLOPs; what changes is the
number of optimizer steps (and the time spent in them), and how far the loss gets for the tokens spent.

The learning rate follows the tokens, not the steps (linear warm-up over the first ``--warmup-fraction`` of the
micro-batches, then a cosine down to 10 %), so that every run sees the same learning rate at the same point of the
data; the schedule's ``lr_scaling`` multiplies it from there. A GradientNoiseScale measures B_simple in every run
(every run accumulates at least two micro-batches), so the table also says where each run ended relative to it.

Columns: final validation loss (nats per byte, mean over ``--val-batches`` batches of the held-out tail of the
corpus), optimizer steps, the global batch at the end (sequences), B_simple at the end (sequences), and the fit's
wall-clock and process CPU time as ratios to the first row (on a shared machine the wall-clock ratio carries the
other processes' load; the CPU time is steadier).

    python benchmarks/batch_size_schedule.py                 # about 5 minutes on 2 busy CPU cores (one thread)
    python benchmarks/batch_size_schedule.py --quick         # a look, under a minute
    python benchmarks/batch_size_schedule.py --markdown      # the table for RESULTS.md
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

from _example import example_gpt, start_lightning_benchmark
from _table import print_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro-batches", type=int, default=2048, help="micro-batches in the run (the token budget)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument(
        "--small", type=int, default=2, help="accumulation of the fixed small batch (and the schedule's start)"
    )
    p.add_argument(
        "--large", type=int, default=16, help="accumulation of the fixed large batch (and the schedule's maximum)"
    )
    p.add_argument(
        "--lr-scaling",
        nargs="+",
        default=["none", "sqrt"],
        choices=["none", "linear", "sqrt"],
        help="one scheduled run per rule",
    )
    p.add_argument("--trigger-ratio", type=float, default=2.0)
    p.add_argument("--min-steps-between-changes", type=int, default=50)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--d-model", type=int, default=96)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (the example's)")
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--val-batches", type=int, default=48)
    p.add_argument("--corpus-bytes", type=int, default=4_000_000)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="192 micro-batches, 8 validation batches")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    if args.quick:
        args.micro_batches, args.val_batches, args.min_steps_between_changes = 192, 8, 10
    for name in ("micro_batches", "micro_batch", "small", "large", "val_batches", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.small < 2:
        p.error("--small must be at least 2: the noise scale needs two micro-batches per step on one device")
    if args.large < args.small:
        p.error("--large must be at least --small")
    return args


def make_module(gpt: Any, args: argparse.Namespace) -> Any:
    """The example GPT with the learning rate scheduled by micro-batches seen (the same for every run)."""
    import lightning as L

    class TokenScheduledGPT(gpt.GPTLightningModule):
        def __init__(self) -> None:
            cfg = gpt.GPTConfig(
                n_layer=args.n_layer,
                d_model=args.d_model,
                n_head=args.n_head,
                d_ff=4 * args.d_model,
                seq_len=args.seq_len,
            )
            super().__init__(cfg, lr=args.lr, use_kernels=False)
            self.micro_batches_seen = 0

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            self.micro_batches_seen += 1  # before the optimizer and scheduler steps of this micro-batch
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1, betas=(0.9, 0.95))
            total, warmup = args.micro_batches, max(1.0, args.warmup_fraction * args.micro_batches)

            def by_tokens(_: int) -> float:
                seen = self.micro_batches_seen
                if seen < warmup:
                    return (seen + 1) / warmup
                progress = min(1.0, (seen - warmup) / max(1.0, total - warmup))
                return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, by_tokens)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    assert issubclass(TokenScheduledGPT, L.LightningModule)
    return TokenScheduledGPT()


@torch.no_grad()
def validation_loss(module: Any, loader: Any, batches: int) -> float:
    module.eval()
    losses = [float(module._loss(batch)) for batch in itertools.islice(loader, batches)]
    module.train()
    return sum(losses) / len(losses)


def run(gpt: Any, args: argparse.Namespace, accumulate: int, lr_scaling: str | None) -> dict[str, Any]:
    """One fit; ``lr_scaling`` None: a fixed batch, else the schedule from ``accumulate`` up to ``args.large``."""
    import lightning as L

    from lightning_scaling.callbacks.batch_size_schedule import BatchSizeSchedule
    from lightning_scaling.callbacks.gradient_noise_scale import GradientNoiseScale

    L.seed_everything(args.seed, verbose=False)
    module = make_module(gpt, args)
    train, val = gpt.make_dataloaders(args.seq_len, args.micro_batch, max_bytes=args.corpus_bytes)
    gns = GradientNoiseScale(warmup_steps=10**9)  # measures; its batch-vs-noise-scale warnings stay quiet
    callbacks: list[Any] = [gns]
    schedule = None
    if lr_scaling is not None:
        schedule = BatchSizeSchedule(
            max_accumulate_grad_batches=args.large,
            trigger_ratio=args.trigger_ratio,
            min_steps_between_changes=args.min_steps_between_changes,
            lr_scaling=lr_scaling,
        )
        callbacks.append(schedule)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=args.micro_batches,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module, train)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "val_loss": validation_loss(module, val, args.val_batches),
        "steps": trainer.global_step,
        "final_batch": trainer.accumulate_grad_batches * args.micro_batch,
        "b_simple": gns.estimate().b_simple,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "changes": [] if schedule is None else schedule.changes,
        "micro_batches": module.micro_batches_seen,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start_lightning_benchmark("batch_size_schedule.py", argv)
    gpt = example_gpt()
    tokens = args.micro_batches * args.micro_batch * args.seq_len
    print(
        f"model: example GPT, {args.n_layer} layers, d_model {args.d_model}, seq {args.seq_len}; "
        f"{args.micro_batches} micro-batches of {args.micro_batch} sequences = {tokens:,} training tokens per run; "
        f"AdamW peak lr {args.lr:g}, by-token warm-up and cosine",
        flush=True,
    )

    plan: list[tuple[str, int, str | None]] = [
        (f"fixed small ({args.small * args.micro_batch} seq)", args.small, None),
        (f"fixed large ({args.large * args.micro_batch} seq)", args.large, None),
    ]
    plan += [(f"schedule, lr_scaling={rule}", args.small, rule) for rule in args.lr_scaling]
    results = []
    for label, accumulate, rule in plan:
        print(f"running: {label} ...", flush=True)
        result = run(gpt, args, accumulate, rule)
        assert result["micro_batches"] == args.micro_batches, result  # the same tokens in every run
        results.append((label, result))
        changes = ", ".join(
            f"step {int(c['step'])}: {int(c['from'] * args.micro_batch)}->"
            f"{int(c['to'] * args.micro_batch)} seq (B_simple {c['b_simple']:.0f})"
            for c in result["changes"]
        )
        print(
            f"  done in {result['seconds']:.0f} s ({result['cpu_seconds']:.0f} s CPU); "
            f"val loss {result['val_loss']:.4f}; {result['steps']} steps"
            + (f"; changes: {changes or 'none'}" if rule is not None else ""),
            flush=True,
        )

    base, cpu_base = results[0][1]["seconds"], results[0][1]["cpu_seconds"]
    header = [
        "run",
        "val loss (nats/byte)",
        "optimizer steps",
        "final global batch (seq)",
        "B_simple at end (seq)",
        "wall-clock (ratio)",
        "CPU time (ratio)",
    ]
    rows = [
        [
            label,
            f"{r['val_loss']:.4f}",
            str(r["steps"]),
            str(r["final_batch"]),
            f"{r['b_simple']:.0f}" if math.isfinite(r["b_simple"]) else "n/a",
            f"{r['seconds'] / base:.2f}",
            f"{r['cpu_seconds'] / cpu_base:.2f}",
        ]
        for label, r in results
    ]
    print()
    print_table(header, rows, args.markdown)


if __name__ == "__main__":
    main()
