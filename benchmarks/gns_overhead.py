"""Per-step overhead of GradientNoiseScale on the example GPT with gradient accumulation.

Runs "no callback" and "GradientNoiseScale" side by side in one process, interleaved over repeats (fresh Trainer
and identical model each time), takes the median per-optimizer-step time of each, and prints a table and the ratio.
Goal: ratio <= 1.02. The split-batch fallback (no accumulation) is measured too with ``--split`` (its expected cost
is about 1/(2·every_n_steps); there the mean per-step time is the one to read, since the extra work falls on one
step in every_n_steps).

    python benchmarks/gns_overhead.py [--steps 12] [--repeats 5] [--accumulate 4] [--batch 8] [--split] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import gpt  # noqa: E402

from lightning_scaling.callbacks.gradient_noise_scale import GradientNoiseScale  # noqa: E402


class StepTimer(Callback):
    """Wall time of each optimizer step (first micro-batch start to the step's last micro-batch end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.fit_loop._should_accumulate():
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)
            self._start = None


def run(variant: str, args: argparse.Namespace, loader) -> list[float]:
    torch.manual_seed(0)
    cfg = gpt.GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, d_model=args.d_model, d_ff=4 * args.d_model)
    module = gpt.GPTLightningModule(cfg, warmup_steps=1)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if variant == "GradientNoiseScale":
        callbacks.append(GradientNoiseScale(warmup_steps=10**9, every_n_steps=args.every_n_steps))
    trainer = L.Trainer(accelerator=args.accelerator, devices=1, max_steps=args.steps,
                        accumulate_grad_batches=args.accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, loader)
    return timer.times[args.skip:]  # drop the first steps (allocator warm-up)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--accumulate", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="micro-batch size (sequences)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--every-n-steps", type=int, default=25)
    p.add_argument("--split", action="store_true", help="no accumulation: measure the split-batch fallback")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.split:
        args.accumulate = 1
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    loader, _ = gpt.make_dataloaders(args.seq_len, args.batch, max_bytes=2_000_000)
    variants = ["no callback", "GradientNoiseScale"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]  # interleave, alternating who goes first
        for v in order:
            times[v].extend(run(v, args, loader))
    base = statistics.median(times["no callback"])
    mode = "split batch" if args.split else f"accumulate_grad_batches={args.accumulate}"
    print(f"\nGPT d_model={args.d_model} n_layer={args.n_layer} seq_len={args.seq_len}, micro-batch {args.batch}, "
          f"{mode}, {args.repeats} interleaved repeats x {args.steps - args.skip} steps, "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    mean_base = statistics.fmean(times["no callback"])
    print(f"{'variant':<22}{'median ms/step':>16}{'p25':>10}{'p75':>10}{'ratio':>9}{'mean ms/step':>14}{'ratio':>9}")
    for v in variants:
        q = statistics.quantiles(times[v], n=4)
        med, mean = statistics.median(times[v]), statistics.fmean(times[v])
        print(f"{v:<22}{1e3 * med:>16.2f}{1e3 * q[0]:>10.2f}{1e3 * q[2]:>10.2f}{med / base:>9.3f}"
              f"{1e3 * mean:>14.2f}{mean / mean_base:>9.3f}")
    # the split-batch fallback costs one step in every_n_steps: its overhead is in the mean, not the median
    ratio = (statistics.fmean(times["GradientNoiseScale"]) / mean_base if args.split
             else statistics.median(times["GradientNoiseScale"]) / base)
    print(f"overhead ({'mean' if args.split else 'median'}): {100 * (ratio - 1):+.2f}% (goal <= +2%)")


if __name__ == "__main__":
    main()
