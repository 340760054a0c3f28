"""Do the two noise-scale sources of GradientNoiseScale agree? The whole model's B_simple from gradient
accumulation against the normalization layers' per-example B_simple, over whole runs of the example GPT at two
model sizes, and what the norm-layer source costs per step.

GradientNoiseScale has two sources when ``accumulate_grad_batches >= 2``:

- the whole model (``cb.estimate()``, logged ``scaling/gns``): micro-batch gradients (b sequences) against the
  optimizer step's gradient (k·b sequences), every parameter (McCandlish et al. 2018, arXiv 1812.06162, App. A.1);
- the normalization layers (``cb.norm_estimator.estimate()``, logged ``scaling/gns_norm_layers``): per-example
  gradients of the LayerNorm weights and biases (a batch of one) against the micro-batch's gradient of the same
  parameters (Gray et al. 2024, arXiv 2411.00999, who report that this tracks the whole model's noise scale in
  transformers).

Both are smoothed the same way (separate EMAs of |G|² and tr(Σ), ``--ema-decay``). Each size trains the example
GPT (examples/gpt.py: byte-level, SwiGLU, tied embeddings, 9 LayerNorms at 4 layers) on the embedded corpus (the
Python standard library's source; nothing downloaded) with the example's optimizer and schedule (AdamW, peak lr
3e-3, linear warm-up then cosine to 10 %), micro-batches of 16 sequences of 128 bytes, ``accumulate_grad_batches=2``
and gradient clipping at 1.0, as ``examples/train_gpt.py`` does. The two sizes differ in width only: d_model 64
(0.29 M parameters) and the example's default d_model 128 (1.10 M, 3.8x), so that both whole runs fit in about six
minutes on one thread of a busy two-core machine.

Per size, a table every ``--every`` optimizer steps: the mean training loss of the step (nats per byte), both
B_simple (in sequences, ± their delta-method standard errors, which treat the smoothed steps as independent and
are therefore lower bounds) and their ratio norm layers / whole model. The summary row is over every step of the
second half of the run: median B_simple of each source and the median ratio [min–max].

Cost of the norm-layer source, from the same run: the time spent inside its hooks (the forward hooks on the norm
layers, the gradient hooks that form the per-example gradients, the per-micro-batch start and the collection
into the step's books) per optimizer step, against the median optimizer-step time (the interval between
consecutive step ends: data loading, forward, backward, optimizer, every callback). The issue's target: <= 1 %.

    python benchmarks/noise_scale_agreement.py                 # about 6 minutes on 2 busy CPU cores (one thread)
    python benchmarks/noise_scale_agreement.py --quick         # 40 steps per size, for a look
    python benchmarks/noise_scale_agreement.py --markdown      # the tables for RESULTS.md
    python benchmarks/noise_scale_agreement.py --d-models 128,256 --steps 500 --threads 2
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

from _example import example_gpt, start_lightning_benchmark
from _table import print_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=250, help="optimizer steps per model size (default: 250)")
    p.add_argument(
        "--d-models",
        default="64,128",
        help="comma-separated model widths, one run each (default: 64,128; 4x the parameters)",
    )
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128, help="bytes per sequence")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step (>= 2)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (the example's)")
    p.add_argument(
        "--ema-decay", type=float, default=0.95, help="GradientNoiseScale's smoothing, per step (0.95: about 39 steps)"
    )
    p.add_argument("--every", type=int, default=25, help="print a table row every this many optimizer steps")
    p.add_argument("--corpus-bytes", type=int, default=4_000_000, help="bytes of the embedded corpus to read")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="40 steps per size, a row every 10")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.every = 40, 10
    for name in ("steps", "n_layer", "n_head", "seq_len", "micro_batch", "every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.accumulate < 2:
        p.error(
            f"--accumulate must be at least 2 (the whole-model estimate needs two micro-batches per step on "
            f"one device), got {args.accumulate}"
        )
    if not 0 < args.ema_decay < 1:
        p.error(f"--ema-decay must be in (0, 1), got {args.ema_decay}")
    if args.micro_batch < 2:
        p.error("--micro-batch must be at least 2 (the norm-layer estimate compares one example with the micro-batch)")
    try:
        args.widths = [int(w) for w in args.d_models.split(",") if w.strip()]
    except ValueError:
        p.error(f"--d-models must be comma-separated whole numbers, got {args.d_models!r}")
    if not args.widths or any(w < 1 or w % args.n_head for w in args.widths):
        p.error(
            f"--d-models must list widths that are positive multiples of --n-head ({args.n_head}), "
            f"got {args.d_models!r}"
        )
    return args


class _Timer:
    """Adds the run time of the functions it wraps to ``seconds``."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def time_norm_layer_source(gns: Any) -> _Timer:
    """Time everything the norm-layer source runs per micro-batch, on this GradientNoiseScale instance."""
    timer = _Timer()
    probe = gns._probe
    make_forward, make_gradient = probe._forward_hook, probe._gradient_hook
    # the hooks are built when the probe attaches (on_train_start): wrap what builds them
    probe._forward_hook = lambda *a: timer.wrap(make_forward(*a))  # keeps the layer's input, hooks its output
    probe._gradient_hook = lambda *a: timer.wrap(make_gradient(*a))  # per-example gradients (``_measure``)
    probe.start = timer.wrap(probe.start)
    gns._collect_norm_layers = timer.wrap(gns._collect_norm_layers)  # the formula check and the step's books
    return timer


def _recorder(gns: Any, timer: _Timer) -> Any:
    from lightning.pytorch import Callback

    class Recorder(Callback):
        """After each optimizer step (placed after the GradientNoiseScale): both estimates, the loss, the step's
        wall time (since the previous step's end) and the norm-layer hooks' time within it."""

        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []
            self._step = 0
            self._last_end: float | None = None
            self._last_hooks = 0.0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._step = trainer.global_step
            self._last_end = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == self._step:
                return  # mid-accumulation
            self._step = trainer.global_step
            now = time.perf_counter()
            whole, norm = gns.estimate(), gns.norm_estimator.estimate()
            self.rows.append(
                {
                    "step": trainer.global_step,
                    "loss": gns.last_loss,
                    "whole": whole.b_simple,
                    "whole_se": whole.stderr,
                    "norm": norm.b_simple,
                    "norm_se": norm.stderr,
                    "seconds": now - (self._last_end or now),
                    "hooks": timer.seconds - self._last_hooks,
                }
            )
            self._last_end, self._last_hooks = now, timer.seconds

    return Recorder()


def run(gpt: Any, args: argparse.Namespace, d_model: int) -> dict[str, Any]:
    """One whole run at width ``d_model``; returns the per-step records and what the callback found."""
    import lightning as L

    from lightning_scaling.callbacks.gradient_noise_scale import GradientNoiseScale

    L.seed_everything(args.seed, verbose=False)
    cfg = gpt.GPTConfig(
        n_layer=args.n_layer, n_head=args.n_head, d_model=d_model, d_ff=4 * d_model, seq_len=args.seq_len
    )
    module = gpt.GPTLightningModule(cfg, lr=args.lr, warmup_steps=min(50, args.steps // 10 + 1), use_kernels=False)
    params = sum(p.numel() for p in module.parameters())
    train, _ = gpt.make_dataloaders(args.seq_len, args.micro_batch, max_bytes=args.corpus_bytes)
    # measures only (no batch warnings); the norm layers on every step, so that both estimates see the same steps
    gns = GradientNoiseScale(
        ema_decay=args.ema_decay,
        warmup_steps=10**9,
        norm_layers_every_n_steps=1,
        tokens_fn=lambda batch: batch[:, 1:].numel(),
    )
    timer = time_norm_layer_source(gns)
    recorder = _recorder(gns, timer)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=1.0,
        callbacks=[gns, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    L.seed_everything(args.seed, verbose=False)  # the same micro-batches in the same order at every width
    start = time.perf_counter()
    trainer.fit(module, train)
    seconds = time.perf_counter() - start
    if gns.mode != "hooks" or not gns.norm_layers_found:
        raise SystemExit(
            f"d_model {d_model}: expected both sources on, got mode {gns.mode!r}, norm layers "
            f"{gns.norm_layers_found or 'none'} ({gns.summary()['status']})"
        )
    return {"params": params, "rows": recorder.rows, "seconds": seconds, "layers": gns.norm_layers_found}


def _number(value: float, stderr: float = math.nan) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.1f}" + (f" ± {stderr:.1f}" if math.isfinite(stderr) else "")


def _ratio(row: dict[str, float]) -> float:
    whole, norm = row["whole"], row["norm"]
    return norm / whole if math.isfinite(whole) and math.isfinite(norm) and whole > 0 else math.nan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start_lightning_benchmark("noise_scale_agreement.py", argv)
    print(
        f"example GPT, {args.n_layer} layers, seq {args.seq_len} bytes; micro-batch {args.micro_batch} sequences x "
        f"accumulate {args.accumulate} = {args.micro_batch * args.accumulate} sequences per step; {args.steps} "
        f"optimizer steps per size; AdamW peak lr {args.lr:g}; GradientNoiseScale(ema_decay={args.ema_decay:g})",
        flush=True,
    )
    gpt = example_gpt()

    results = []
    for d_model in args.widths:
        print(f"running d_model {d_model} ...", flush=True)
        result = run(gpt, args, d_model)
        results.append((d_model, result))
        print(
            f"  done in {result['seconds']:.0f} s; {result['params'] / 1e6:.2f} M parameters; norm layers: "
            f"{result['layers']}",
            flush=True,
        )

    header = [
        "step",
        "train loss (nats/byte)",
        "whole-model B_simple (seq)",
        "norm-layer B_simple (seq)",
        "ratio norm/whole",
    ]
    summary = []
    for d_model, result in results:
        rows = result["rows"]
        half = rows[len(rows) // 2 :]
        ratios = [r for r in map(_ratio, half) if math.isfinite(r)]
        shown = [r for r in rows if r["step"] % args.every == 0 or r is rows[-1]]
        table = [
            [
                str(int(r["step"])),
                f"{r['loss']:.3f}",
                _number(r["whole"], r["whole_se"]),
                _number(r["norm"], r["norm_se"]),
                f"{_ratio(r):.2f}" if math.isfinite(_ratio(r)) else "n/a",
            ]
            for r in shown
        ]

        def median(key: str, of: list[dict[str, float]] = half) -> float:
            values = [r[key] for r in of if math.isfinite(r[key])]
            return statistics.median(values) if values else math.nan

        spread = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}]" if ratios else "n/a"
        second_half = f"median, steps {int(half[0]['step'])}–{int(half[-1]['step'])}" if half else "median"
        table.append([second_half, "", _number(median("whole")), _number(median("norm")), spread])
        print(f"\nd_model {d_model} ({result['params'] / 1e6:.2f} M parameters; {result['layers']}):")
        print_table(header, table, args.markdown)
        # the first step (set-up, the formula check) is left out of the per-step figures
        steady = rows[1:] or rows
        step_ms = 1e3 * statistics.median(r["seconds"] for r in steady)
        hooks_ms = 1e3 * statistics.median(r["hooks"] for r in steady)
        summary.append(
            [
                str(d_model),
                f"{result['params'] / 1e6:.2f}",
                str(len(rows)),
                spread,
                f"{step_ms:.0f}",
                f"{hooks_ms:.2f}",
                f"{100 * hooks_ms / step_ms:.2f} %",
            ]
        )

    print("\nsummary (ratio: norm-layer / whole-model B_simple over the second half; cost: median over steps 2+):")
    print_table(
        [
            "d_model",
            "parameters (M)",
            "steps",
            "ratio norm/whole, median [min–max]",
            "step ms (median)",
            "norm-layer hooks ms/step (median)",
            "hooks / step",
        ],
        summary,
        args.markdown,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
