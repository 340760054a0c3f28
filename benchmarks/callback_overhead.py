"""What adding ScalingMonitor costs a user: whole fits, all parts on vs off, side by side in one process.

Each configuration trains the same model on the same batches twice per repeat, without and with
``ScalingMonitor()`` (defaults), in alternating order, so that drift in machine load hits both alike. Each repeat
runs every configuration once (configurations interleaved), so a row's repeats are spread over the whole run and
its range takes in the machine's drift over the run. A row reports, over the repeats:

- ``whole fit``: the ratio of ``trainer.fit`` wall times (first steps, the FLOP measurement and Lightning's own
  setup included), min–median–max over the repeats, each repeat's ratio taken within its pair;
- ``whole fit off/off`` (``--noise-floor``): the same ratio between two fits that both run without the monitor
  (a third fit after each pair, against the pair's): what the machine's drift alone does to the column before;
- ``same-run whole fit``: the monitored fit's wall time over the same time less what we spent in it (our hooks
  and the FLOP-measured steps' extra time beyond unmeasured steps of the same size), from the monitored run
  alone: free of the machine's drift between two runs, which on a shared machine can exceed the effect;
- ``same-run, paired measured steps``: the same, with each FLOP-measured step compared with the same step (same
  batch) of the paired fit without the monitor instead of with later steps of its size: a measured step is the
  first batch of its shape, which costs more than later ones with or without us (new allocations, kernels picked
  for new sizes), so the column before charges us for that too;
- ``steady``: the same ratio over the steps after the first ``--warmup`` ones (median step time);
- ``bookkeeping``, ``gradient norms`` and ``norm layers`` (ms per optimizer step): the time spent inside the
  monitor's per-batch hooks and its gradient hooks, measured in the same run (free of machine noise) and split
  three ways. The noise scale's two measurements, which read gradients and so grow with the model like the step:
  ``gradient norms``, the whole model's gradients (with accumulation or DDP only: every call of the gradient
  hooks, which keep the incoming gradients, and the fused norms of those and of ``.grad``); ``norm layers``, the
  normalization layers' per-example gradients (every 4th step by default). ``bookkeeping`` is the rest, a fixed
  cost per step: the ledger, the parts' books, logging. The FLOP-measured steps' slowdown happens inside the
  user's step and shows in the whole-fit ratios instead;
- ``measured`` / ``shapes``: input shapes counted under the FLOP counter / distinct input shapes the run saw (a
  benchmark that measured nothing says 0);
- ``peak mem``: peak resident memory of a fit with the monitor over one without, each fit in a fresh process
  (``--memory``; CPU: resident set size; CUDA: ``torch.cuda.max_memory_allocated``).

Configurations: the example GPT (4 layers, d_model 128, seq 128, micro-batch 16) with accumulation 2 and 1; a
Hugging Face ``LlamaForCausalLM`` built from a tiny config (4 layers, hidden 128, 4 heads, 2 key/value heads;
random init, nothing downloaded) on fixed shapes, and on pad-to-longest batches (attention mask, labels -100 at
the padding) with 10, 30 and 64 distinct lengths.

    python benchmarks/callback_overhead.py                      # CPU, one thread, about 30 minutes
    python benchmarks/callback_overhead.py --quick              # 2 repeats of short fits, for a look
    python benchmarks/callback_overhead.py --noise-floor --memory --markdown   # with the off/off spread
    python benchmarks/callback_overhead.py --device cuda --steps 60
    python benchmarks/callback_overhead.py --only gpt-acc2 --repeats 5 --markdown
    python benchmarks/callback_overhead.py --json overhead.json # also every repeat's figures, in the order they ran

Goal (CPU): whole fit <= 1.03x in every row, peak memory <= 1.05x, bookkeeping <= 2 ms per optimizer step (the noise
scale's measurements are budgeted as a share of the step instead: the norm layers <= 1%).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

from _example import example_gpt
from _table import print_table

CONFIGS = ("gpt-acc2", "gpt-acc1", "llama-fixed", "llama-pad10", "llama-pad30", "llama-pad64")
PER_STEP_HOOKS = ("on_train_batch_start", "on_after_backward", "on_before_optimizer_step", "on_train_batch_end")


# --------------------------------------------------------------------------------------------- workloads
def _gpt_workload(args: argparse.Namespace) -> tuple[Any, Any]:
    gpt = example_gpt()
    from torch.utils.data import DataLoader

    cfg = gpt.GPTConfig(n_layer=4, d_model=128, n_head=4, seq_len=128, d_ff=512)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 256, (args.steps * 2 * 16, 129), generator=g)
    return (lambda: gpt.GPTLightningModule(cfg, use_kernels=False)), DataLoader(rows, batch_size=16)


def _llama_workload(args: argparse.Namespace, distinct: int | None) -> tuple[Any, Any]:
    import lightning as L
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )

    class LlamaModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = LlamaForCausalLM(config)
            self.config = config

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            loss = self.model(**batch).loss
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    batches = []
    lengths = [128] if distinct is None else torch.linspace(16, 128, distinct).round().int().tolist()
    for _ in range(args.steps):
        longest = lengths[int(torch.randint(0, len(lengths), (1,), generator=g))] if distinct else 128
        rows = torch.randint(1, 512, (16, longest), generator=g)
        mask = torch.ones_like(rows)
        if distinct:  # pad to the longest row: other rows are shorter, their tails are padding
            for r in range(1, 16):
                keep = int(torch.randint(8, longest + 1, (1,), generator=g))
                mask[r, keep:] = 0
            rows = rows * mask
        labels = rows.masked_fill(mask == 0, -100)
        batches.append({"input_ids": rows, "attention_mask": mask, "labels": labels})
    from torch.utils.data import DataLoader

    return LlamaModule, DataLoader(batches, batch_size=None)


def workload(name: str, args: argparse.Namespace) -> tuple[Any, Any, int]:
    """(module factory, train loader, accumulate_grad_batches) of one configuration."""
    if name.startswith("gpt"):
        make, loader = _gpt_workload(args)
        return make, loader, 2 if name == "gpt-acc2" else 1
    distinct = None if name == "llama-fixed" else int(name.removeprefix("llama-pad"))
    make, loader = _llama_workload(args, distinct)
    return make, loader, 1


# ------------------------------------------------------------------------------------------ measurement
class StepClock:
    """Wall-clock time of each optimizer step (all its micro-batches), synchronised on CUDA."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.measured: list[bool] = []  # whether the step held a FLOP-measured micro-batch
        self.tokens: list[int] = []  # token positions (batch x sequence) the step trained on
        self.probe: Any = lambda: 0  # how many shapes the monitor has measured so far
        self._start: float | None = None
        self._step = -1
        self._seen = 0
        self._tokens = 0

    def _sync(self, trainer: Any) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: Any, batch: Any = None) -> None:
        if self._start is None:
            self._sync(trainer)
            self._start, self._step = time.perf_counter(), trainer.global_step
            self._tokens = 0
        if batch is not None:
            shape = _shape(batch)
            self._tokens += shape[0] * (shape[1] if len(shape) > 1 else 1)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step != self._step:
            self._sync(trainer)
            self.times.append(time.perf_counter() - self._start)
            self.tokens.append(self._tokens)
            self._start = None
            measured = self.probe()
            self.measured.append(measured > self._seen)
            self._seen = measured

    def measurement_extra(self) -> float:
        """Seconds the FLOP-measured steps took beyond what an unmeasured step of the same size takes: the
        median of the unmeasured steps with the same token count, else of the three nearest in token count (with
        pad-to-longest batches a measured step is often longer than the median step, which is not our cost)."""
        plain = [(n, t) for t, m, n in zip(self.times, self.measured, self.tokens, strict=True) if not m]
        if not plain:
            return 0.0
        extra = 0.0
        for t, m, n in zip(self.times, self.measured, self.tokens, strict=True):
            if not m:
                continue
            same = [pt for pn, pt in plain if pn == n]
            if not same:
                same = [pt for _, pt in sorted(plain, key=lambda p: abs(p[0] - n))[:3]]
            extra += max(t - statistics.median(same), 0.0)
        return extra


def _timed_monitor(tokens_fn: Any = None) -> tuple[Any, list[float]]:
    """A ScalingMonitor whose hooks (and gradient hooks) add their own run time to ``spent[0]``; the part of it
    that is the norm layers' per-example gradients (measured every few steps) also goes to ``spent[1]``, and the
    part that reads the whole model's gradients for the noise scale (the gradient hooks and the fused norms of
    ``.grad``) to ``spent[2]``."""
    from lightning_scaling.callbacks import ScalingMonitor
    from lightning_scaling.callbacks.gradient_noise_scale import GradientNoiseScale

    spent = [0.0, 0.0, 0.0]
    running = [0, 0, 0]  # timers open per slot: a timed call inside another of the same slot is counted once

    def timed(fn: Any, *slots: int) -> Any:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            mine = [slot for slot in slots if not running[slot]]
            for slot in mine:
                running[slot] += 1
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                elapsed = time.perf_counter() - t
                for slot in mine:
                    spent[slot] += elapsed
                    running[slot] -= 1

        return wrapper

    monitor = ScalingMonitor(tokens_fn=tokens_fn, report=False)
    for name in PER_STEP_HOOKS:  # what runs every step; setup and the pre-flight run once per fit
        setattr(monitor, name, timed(getattr(monitor, name), 0))
    gns = monitor.parts.get("noise_scale")
    if isinstance(gns, GradientNoiseScale):
        make_hook = gns._make_hook
        gns._make_hook = lambda param: timed(make_hook(param), 0, 2)  # type: ignore[method-assign]
        # (these run inside timed hooks; each slot counts a nested call once)
        gns._grad_sq = timed(gns._grad_sq, 2)  # type: ignore[method-assign]
        gns._norm_held = timed(gns._norm_held, 2)  # type: ignore[method-assign]
        # norm-layer gradients: in the backward (a gradient hook of our own) and after it (inside a timed hook)
        gns._probe._measure = timed(gns._probe._measure, 0, 1)  # type: ignore[method-assign]
        gns._probe.collect = timed(gns._probe.collect, 1)  # type: ignore[method-assign]
    return monitor, spent


def fit_once(name: str, with_monitor: bool, args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L

    make, loader, accumulate = workload(name, args)
    L.seed_everything(0, verbose=False)
    clock = StepClock()
    callbacks: list[Any] = [_callback(clock)]
    spent = [0.0, 0.0, 0.0]
    monitor = None
    if with_monitor:
        monitor, spent = _timed_monitor()
        callbacks.append(monitor)
        clock.probe = lambda: monitor.flops.measured_shapes
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        max_steps=args.steps // accumulate,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=10,
        precision="bf16-mixed" if args.device == "cuda" else "32-true",
        callbacks=callbacks,
    )
    module = make()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    if args.device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    steps = max(trainer.global_step, 1)
    shapes = {_shape(b) for b in loader}
    return {
        "wall": wall,
        # what the same fit would have taken without us, from this run alone: minus our hooks' time and the
        # measured steps' extra time (free of the machine's drift between runs)
        "own_seconds": spent[0] + clock.measurement_extra(),
        "hooks_seconds": spent[0],
        "step_times": clock.times,
        "step_measured": clock.measured,
        "steady": statistics.median(clock.times[args.warmup :]) if len(clock.times) > args.warmup else float("nan"),
        "hooks_ms_per_step": 1e3 * spent[0] / steps,
        "norm_layers_ms_per_step": 1e3 * spent[1] / steps,
        "gradient_norms_ms_per_step": 1e3 * spent[2] / steps,
        "measured": monitor.flops.measured_shapes if monitor else 0,
        "shapes": len(shapes),
        "cuda_peak": torch.cuda.max_memory_allocated() if args.device == "cuda" else None,
    }


def _callback(clock: StepClock) -> Any:
    from lightning.pytorch import Callback

    class Clock(Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            clock.on_train_batch_start(trainer, batch)

        def on_train_batch_end(self, trainer: Any, *a: Any) -> None:
            clock.on_train_batch_end(trainer)

    return Clock()


def _shape(batch: Any) -> tuple:
    if isinstance(batch, dict):
        return tuple(batch["input_ids"].shape)
    return tuple(batch.shape)


def peak_memory_ratio(name: str, args: argparse.Namespace) -> float | None:
    """Peak memory with the monitor over without, each fit in a fresh process."""
    peaks = []
    for with_monitor in (False, True):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--steps",
            str(args.steps),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ] + (["--with-monitor"] if with_monitor else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        out, _ = proc.communicate()
        result = json.loads(out.strip().splitlines()[-1])
        peaks.append(result["cuda_peak"] if args.device == "cuda" else result["max_rss_kib"])
    return peaks[1] / peaks[0] if peaks[0] else None


def _child(args: argparse.Namespace) -> int:
    import resource

    result = fit_once(args.child, args.with_monitor, args)
    result["max_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(result))
    return 0


def _paired_extra(on: dict[str, Any], off: dict[str, Any]) -> float:
    """Seconds the FLOP-measured steps of the monitored fit took beyond the same steps (same index, same batch) of
    the paired fit without the monitor. Unlike ``StepClock.measurement_extra``, the baseline pays what the first
    batch of a new shape costs anyway (new allocations, kernels chosen for new sizes). Per-step noise between the
    two fits enters both ways; the total is floored at 0."""
    if len(on["step_times"]) != len(off["step_times"]):
        return 0.0
    extra = sum(
        t_on - t_off
        for t_on, t_off, m in zip(on["step_times"], off["step_times"], on["step_measured"], strict=True)
        if m
    )
    return max(extra, 0.0)


# --json: the table's columns under their own names
_JSON_NAMES = {
    "whole": "whole_fit_on_off",
    "floor": "whole_fit_off_off",
    "same_run": "same_run_whole_fit",
    "paired": "same_run_paired_measured_steps",
    "steady": "steady_on_off",
    "hooks": "bookkeeping_ms_per_step",
    "grads": "gradient_norms_ms_per_step",
    "norm": "norm_layers_ms_per_step",
}


def _spread(values: list[float], digits: int = 3) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=80, help="micro-batches per fit (optimizer steps x accumulation)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state figure")
    p.add_argument("--repeats", type=int, default=4, help="pairs (off, on) per configuration")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (stated in the output)")
    p.add_argument("--only", default=",".join(CONFIGS), help=f"comma-separated configurations of {CONFIGS}")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (fresh processes)")
    p.add_argument(
        "--noise-floor",
        action="store_true",
        help="also fit without the monitor a second time in each repeat: the spread of off/off is the machine's",
    )
    p.add_argument("--quick", action="store_true", help="2 repeats of 30-step fits")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write every repeat's figures, in the order they ran, to PATH (to tell an outlier's cause)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--with-monitor", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 2, 30
    torch.set_num_threads(args.threads)
    if args.child:
        return _child(args)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"--only: unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")

    import lightning as L

    import lightning_scaling

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} lightning={L.__version__} "
        f"lightning_scaling={lightning_scaling.__version__} date={time.strftime('%Y-%m-%d')} "
        f"repeats={args.repeats} micro-batches/fit={args.steps}",
        flush=True,
    )
    for name in names:
        fit_once(name, False, args)  # warm each configuration's code paths once, untimed
    # Repeats are the outer loop: each row's pairs are spread over the whole run, so its range takes in the
    # machine's drift over the run, not over a few minutes of it (a second run then lands inside it, or near).
    keys = ("whole", "floor", "same_run", "paired", "steady", "hooks", "grads", "norm")
    series: dict[str, dict[str, list[float]]] = {name: {key: [] for key in keys} for name in names}
    counted: dict[str, str] = {}
    log: list[dict[str, Any]] = []  # every repeat's figures in the order they ran (--json)
    for repeat in range(args.repeats):
        for name in names:
            got = series[name]
            order = (False, True) if repeat % 2 == 0 else (True, False)
            pair = {flag: fit_once(name, flag, args) for flag in order}
            if args.noise_floor:  # after the pair: off again, against the pair's off fit
                got["floor"].append(fit_once(name, False, args)["wall"] / pair[False]["wall"])
            on = pair[True]
            got["whole"].append(on["wall"] / pair[False]["wall"])
            got["same_run"].append(on["wall"] / (on["wall"] - on["own_seconds"]))
            got["paired"].append(on["wall"] / (on["wall"] - on["hooks_seconds"] - _paired_extra(on, pair[False])))
            got["steady"].append(on["steady"] / pair[False]["steady"])
            got["hooks"].append(
                on["hooks_ms_per_step"] - on["norm_layers_ms_per_step"] - on["gradient_norms_ms_per_step"]
            )
            got["grads"].append(on["gradient_norms_ms_per_step"])
            got["norm"].append(on["norm_layers_ms_per_step"])
            counted[name] = f"{on['measured']}/{on['shapes']}"
            figures = {_JSON_NAMES[key]: got[key][-1] for key in keys if got[key]}
            log.append({"repeat": repeat + 1, "configuration": name, **figures})
            progress = f"  repeat {repeat + 1}/{args.repeats} {name}: whole {got['whole'][-1]:.3f}"
            print(progress, file=sys.stderr, flush=True)
    rows = []
    for name in names:
        got = series[name]
        memory = peak_memory_ratio(name, args) if args.memory else None
        rows.append(
            [
                name,
                _spread(got["whole"]),
                _spread(got["floor"]) if got["floor"] else "-",
                _spread(got["same_run"]),
                _spread(got["paired"]),
                _spread(got["steady"]),
                _spread(got["hooks"], 2),
                _spread(got["grads"], 2),
                _spread(got["norm"], 2),
                counted[name],
                "-" if memory is None else f"{memory:.3f}",
            ]
        )

    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "repeats": log}, indent=1) + "\n")
    print()
    print_table(
        [
            "configuration",
            "whole fit on/off",
            "whole fit off/off",
            "same-run whole fit",
            "same-run, paired measured steps",
            "steady on/off",
            "bookkeeping ms/step",
            "gradient norms ms/step",
            "norm layers ms/step",
            "measured/shapes",
            "peak mem on/off",
        ],
        rows,
        args.markdown,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
