"""Per-step overhead of ScalingMonitor on the example GPT, side by side in one run.

Three configurations train the same model on the same batches, interleaved over several repeats:

- ``none``: no callback
- ``monitor``: ``ScalingMonitor`` (every part on)
- ``flopcounter_every_step``: torch's ``FlopCounterMode`` around every training step (what counting without a
  cache costs)

The median step time of each (warm-up steps dropped) and its ratio to ``none`` are printed as a table.
Goal: ScalingMonitor <= 1.03x no callbacks.

    python benchmarks/callback_overhead.py             # CPU, about 2 minutes on 2 cores
    python benchmarks/callback_overhead.py --device cuda --steps 60
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import lightning as L  # noqa: E402
from gpt import GPTConfig, GPTLightningModule, make_dataloaders  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lightning_scaling.callbacks import ScalingMonitor  # noqa: E402


class StepTimer(Callback):
    """Wall-clock time of each optimizer step (all its micro-batches), synchronised on CUDA."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start: float | None = None
        self._step = -1

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._sync(trainer)
            self._start = time.perf_counter()
            self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._step:
            self._sync(trainer)
            self.times.append(time.perf_counter() - self._start)
            self._start = None


class FlopCounterEveryStep(Callback):
    """The naive approach: torch's FlopCounterMode around every forward and backward."""

    def __init__(self) -> None:
        self.mode: FlopCounterMode | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.mode = FlopCounterMode(display=False)
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None


def target_tokens(batch: torch.Tensor) -> int:
    return batch[:, 1:].numel()


def run(config: str, args: argparse.Namespace, train) -> list[float]:
    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    extra = {"none": [], "monitor": [ScalingMonitor(tokens_fn=target_tokens, report=False)],
             "flopcounter_every_step": [FlopCounterEveryStep()]}[config]
    model = GPTLightningModule(GPTConfig(n_layer=args.n_layer, d_model=args.d_model, n_head=4, seq_len=args.seq_len),
                               use_kernels=False)
    trainer = L.Trainer(
        accelerator=args.device, devices=1, max_steps=args.steps, accumulate_grad_batches=args.accumulate,
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[timer, *extra],
    )
    trainer.fit(model, train)
    return timer.times[args.warmup:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps dropped from each run (counting pass, warm-up)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--accumulate", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    args = p.parse_args(argv)
    import lightning_scaling

    print(f"device={args.device} torch={torch.__version__} lightning={L.__version__} "
          f"lightning_scaling={lightning_scaling.__version__} threads={torch.get_num_threads()}")
    train, _ = make_dataloaders(args.seq_len, args.batch_size, max_bytes=2_000_000)
    configs = ["none", "monitor", "flopcounter_every_step"]
    samples: dict[str, list[float]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        for config in configs:  # interleaved, so drift in machine load hits every configuration alike
            samples[config] += run(config, args, train)
    base = statistics.median(samples["none"])
    print(f"\n{'configuration':<26}{'median step (ms)':>18}{'ratio to none':>15}{'steps timed':>13}")
    for config in configs:
        med = statistics.median(samples[config])
        print(f"{config:<26}{med * 1e3:>18.1f}{med / base:>15.3f}{len(samples[config]):>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
