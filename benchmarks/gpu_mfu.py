"""MFU of the example GPT on a CUDA GPU as FlopCounter reports it, against a hand computation; and the host
synchronisations per optimizer step that ScalingMonitor adds. Runs 4 and 5b of ``benchmarks/gpu_check.py``.

``mfu``: the example GPT (``examples/gpt.py``, loaded by file path; ``MFU_SHAPE``: about 100M parameters, head
dim 128, 16k tokens per optimizer step) trains for ``--steps`` optimizer steps in bf16-mixed, with our Triton
kernels and then without them, under ``FlopCounter(peak_flops=None)`` (the dense peak comes from the hardware
table, ``lightning_scaling.flops.hardware``). Per run it prints:

- MFU, FLOP/s and FLOPs per step as the callback logs them (``scaling/mfu``, ``scaling/flops_per_sec``,
  ``scaling/flops_per_step``), read from ``trainer.callback_metrics`` once, after the last step: reading them
  during training would synchronise with the device and change what is measured;
- the hand computation: FLOPs per optimizer step from the analytic formula (``lightning_scaling.flops``,
  ``transformer_flops``; PaLM App. B, matmul FLOPs, causal attention counted as half, which is what a FLOP
  counter measures; the Chinchilla App. F count is printed beside it), over the step time measured with CUDA
  events recorded at every optimizer-step boundary (read once after the fit: no host sync), over the same dense
  peak, taken over the callback's sliding window (its last ``window`` steps);
- callback MFU / hand MFU, split into its two factors: callback FLOPs / analytic FLOPs, and CUDA-event step
  time / the step time the callback's FLOP/s implies (the callback times steps with the host clock);
- the bf16 rate of an 8192³ matmul on the device, the practical ceiling beside the datasheet peak.

``syncs``: the example GPT at its own small shape (``SYNC_SHAPE``) trained twice, with no callback and with
ScalingMonitor (every part on). During the fit ``torch.cuda.set_sync_debug_mode("warn")`` makes every
synchronising CUDA call (``.item()``, a blocking copy) warn; the warnings are counted per optimizer step after
``--warmup`` steps and grouped by the source line that triggered them. Explicit ``torch.cuda.synchronize()`` calls
do not warn, so ``torch.profiler`` also counts the CUDA runtime's ``*Synchronize`` calls over the same steps.

Each subcommand prints Markdown between ``<!-- gpu_check:begin -->`` and ``<!-- gpu_check:end -->`` and, last, one
line ``GPU_CHECK_RESULT {json}`` that ``gpu_check.py`` reads. Exit codes: 0 measured, 1 a run failed, 2 no CUDA GPU.

    python benchmarks/gpu_mfu.py mfu      # 35-60 s on an H200 (an estimate, not yet measured)
    python benchmarks/gpu_mfu.py syncs    # 15-25 s on an H200 (an estimate)
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_GPT = REPO / "examples" / "gpt.py"
RESULT_PREFIX = "GPU_CHECK_RESULT "
BEGIN_MARK = "<!-- gpu_check:begin -->"
END_MARK = "<!-- gpu_check:end -->"
SYNC_WARNING_TEXT = "called a synchronizing CUDA operation"  # torch's message under set_sync_debug_mode("warn")
CALLBACK_METRICS = ("scaling/mfu", "scaling/flops_per_sec", "scaling/flops_per_step", "train/loss")
FLOPCOUNTER_DEFAULT_WINDOW = 20  # FlopCounter's documented default, used when the instance does not say


@dataclass(frozen=True)
class RunShape:
    """The example GPT's shape and the batch of one run. ``batch_size`` sequences of ``seq_len`` tokens per
    micro-batch, ``accumulate`` micro-batches per optimizer step."""

    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    seq_len: int
    batch_size: int
    accumulate: int
    vocab_size: int = 256

    def __post_init__(self) -> None:
        for name in ("n_layer", "d_model", "n_head", "d_ff", "seq_len", "batch_size", "accumulate", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model must be divisible by n_head, got d_model={self.d_model}, n_head={self.n_head}")

    @property
    def tokens_per_step(self) -> int:
        """Tokens the model predicts per optimizer step."""
        return self.batch_size * self.accumulate * self.seq_len


# ~100M parameters, head dim 128, 16k tokens per optimizer step: large enough that step time is GPU work,
# small enough that 100 steps take seconds on an H200.
MFU_SHAPE = RunShape(n_layer=8, d_model=1024, n_head=8, d_ff=2816, seq_len=1024, batch_size=16, accumulate=1)
# The example's own default shape (examples/train_gpt.py): host overhead and syncs matter most at this size.
SYNC_SHAPE = RunShape(n_layer=4, d_model=128, n_head=4, d_ff=512, seq_len=128, batch_size=16, accumulate=2)


def load_example_gpt() -> ModuleType:
    """``examples/gpt.py`` imported by file path (registered in ``sys.modules`` so its dataclasses resolve)."""
    name = "lightning_scaling_example_gpt"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE_GPT)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the example GPT from {EXAMPLE_GPT.name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def analytic_flops_per_step(shape: RunShape, convention: str) -> float:
    """Training FLOPs (forward + backward) of one optimizer step from ``lightning_scaling.flops``.

    The model is causal; causal attention is counted as half the square (the library's convention).
    """
    from lightning_scaling.flops.formulas import transformer_flops

    per_sequence = transformer_flops(
        n_layer=shape.n_layer,
        d_model=shape.d_model,
        n_head=shape.n_head,
        seq_len=shape.seq_len,
        vocab_size=shape.vocab_size,
        d_ff=shape.d_ff,
        gated_mlp=True,
        causal=True,
        convention=convention,
        causal_attention="half",
    ).total
    return per_sequence * shape.batch_size * shape.accumulate


def target_tokens(batch: Any) -> int:
    """Training tokens of a batch of [B, seq_len + 1] windows: the seq_len predicted bytes of each."""
    return int(batch[:, 1:].numel())


def _gpt_config(gpt: ModuleType, shape: RunShape) -> Any:
    return gpt.GPTConfig(
        vocab_size=shape.vocab_size,
        seq_len=shape.seq_len,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        d_model=shape.d_model,
        d_ff=shape.d_ff,
    )


def _check_device(device: str) -> str:
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' (the measurement) or 'cpu' (a smoke test), got {device!r}")
    return device


def _make_step_boundary_callback(device: str) -> Any:
    """A callback that marks the start of training and the end of every optimizer step (a CUDA event on CUDA, the
    host clock on the CPU), and reads the metrics in ``CALLBACK_METRICS`` once, when training ends.

    Reading ``trainer.callback_metrics`` during training would synchronise with the device (Lightning turns
    progress-bar metrics into Python numbers on access) and so change what is measured: the callback's clock
    runs on the host, and whether the host runs ahead of the device is part of what this check looks at.
    """
    import torch
    from lightning.pytorch import Callback

    class _HostClock:
        def __init__(self) -> None:
            self.seconds = time.perf_counter()

    def mark() -> Any:
        if device != "cuda":
            return _HostClock()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    class StepBoundaries(Callback):
        def __init__(self) -> None:
            self.marks: list[Any] = []
            self.metrics: dict[int, dict[str, float]] = {}  # optimizer step -> metrics logged after it
            self._last_step = 0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.marks.append(mark())

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step != self._last_step:
                self._last_step = trainer.global_step
                self.marks.append(mark())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            found = {
                key: float(value)
                for key in CALLBACK_METRICS
                if (value := trainer.callback_metrics.get(key)) is not None
            }
            self.metrics[trainer.global_step] = found

        def step_seconds(self) -> list[float]:
            """Seconds of each optimizer step (on CUDA from the events: synchronises once)."""
            if device != "cuda":
                return [b.seconds - a.seconds for a, b in itertools.pairwise(self.marks)]
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]

    return StepBoundaries()


def _trainer(callbacks: list[Any], steps: int, accumulate: int, device: str) -> Any:
    import lightning as L

    return L.Trainer(
        accelerator=device,
        devices=1,
        precision="bf16-mixed" if device == "cuda" else "32-true",
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def hardware_peak() -> dict[str, Any]:
    """What the hardware table finds for the current CUDA device in bf16 (FLOP/s; None when the table does not
    know it), and what Lightning's own table says. Without CUDA: no device, no peak."""
    import torch

    from lightning_scaling.flops.hardware import device_peak_flops, parse_device_name

    if not torch.cuda.is_available():
        return {"device_name": "cpu", "table_key": None, "peak_bf16_flops": None, "lightning_peak_bf16_flops": None}
    name = torch.cuda.get_device_name()
    lightning_peak: float | None
    try:
        from lightning.fabric.utilities.throughput import get_available_flops

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = get_available_flops(torch.device("cuda"), torch.bfloat16)
        lightning_peak = float(value) if value else None
    except Exception:  # noqa: BLE001 - only a comparison
        lightning_peak = None
    return {
        "device_name": name,
        "table_key": parse_device_name(name),
        "peak_bf16_flops": device_peak_flops(torch.device("cuda"), "bf16"),
        "lightning_peak_bf16_flops": lightning_peak,
    }


def matmul_ceiling(size: int = 8192, repeats: int = 10, warmups: int = 3) -> float:
    """bf16 FLOP/s of one ``size``³ matrix product through torch on the current CUDA device: the mean of
    ``repeats`` products timed with CUDA events after ``warmups``, on random inputs (zeros run faster)."""
    import torch

    for name, value in (("size", size), ("repeats", repeats)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(warmups):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * size**3 / seconds


def compare_with_hand(
    step_seconds: list[float],
    metrics: dict[int, dict[str, float]],
    analytic_flops: float,
    peak_flops: float | None,
    window: int,
    first_step: int,
) -> dict[str, Any]:
    """Callback MFU against the hand computation at each step the callback's metrics were read after.

    ``step_seconds[k - 1]`` is the measured time of optimizer step ``k`` (seconds); ``metrics[k]`` what the
    callback logged after it. For every such step ``k`` from ``first_step + window - 1`` on (its window holds no
    warm-up step), the hand MFU is ``analytic_flops × n / sum(step_seconds of the n = window steps up to k) /
    peak_flops`` (FLOPs, FLOP/s), the callback's FLOP/s window being its last ``window`` steps. Returned: medians
    over those steps and the last one's values, with the ratio's two factors: callback FLOPs / analytic FLOPs, and
    measured step time / the step time the callback's FLOP/s implies.
    """
    rows: list[dict[str, float | None]] = []
    for step in sorted(metrics):
        values = metrics[step]
        if step < first_step + window - 1 or step > len(step_seconds):
            continue
        span = step_seconds[max(0, step - window) : step]
        mean_seconds = sum(span) / len(span)
        cb_mfu, cb_flops, cb_rate = (
            values.get(k) for k in ("scaling/mfu", "scaling/flops_per_step", "scaling/flops_per_sec")
        )
        hand = analytic_flops / mean_seconds / peak_flops if peak_flops else None
        rows.append(
            {
                "step": step,
                "callback_mfu": cb_mfu,
                "hand_mfu": hand,
                "mfu_ratio": cb_mfu / hand if (cb_mfu and hand) else None,
                "flops_ratio": cb_flops / analytic_flops if cb_flops else None,
                "time_ratio": mean_seconds * cb_rate / cb_flops if (cb_flops and cb_rate) else None,
                "callback_flops_per_step": cb_flops,
                "callback_flops_per_sec": cb_rate,
                "measured_flops_per_sec": analytic_flops / mean_seconds,
            }
        )

    def median(key: str) -> float | None:
        found = [value for r in rows if (value := r[key]) is not None]
        return statistics.median(found) if found else None

    last = rows[-1] if rows else {}
    return {
        "steps_compared": len(rows),
        "callback_mfu": median("callback_mfu"),
        "hand_mfu_window": median("hand_mfu"),
        "mfu_ratio_callback_over_hand": median("mfu_ratio"),
        "flops_ratio_callback_over_analytic": median("flops_ratio"),
        "time_ratio_measured_over_callback": median("time_ratio"),
        "callback_flops_per_step": median("callback_flops_per_step"),
        "callback_flops_per_sec": median("callback_flops_per_sec"),
        "measured_flops_per_sec": median("measured_flops_per_sec"),
        "last_step": {k: last.get(k) for k in ("step", "callback_mfu", "hand_mfu", "mfu_ratio", "time_ratio")},
    }


def measure_mfu(
    use_kernels: bool,
    shape: RunShape = MFU_SHAPE,
    steps: int = 100,
    warmup: int = 10,
    corpus_bytes: int = 4_000_000,
    device: str = "cuda",
    peak_flops: float | None = None,
) -> dict[str, Any]:
    """Train the example GPT for ``steps`` optimizer steps under ``FlopCounter(peak_flops=peak_flops)`` and return
    the callback's MFU beside the hand computation (see the module docstring). Times in seconds, FLOPs as counts,
    MFU as a fraction of the dense peak (FLOP/s of one device; None: the hardware table's bf16 figure).

    ``device="cuda"`` (bf16-mixed) is the measurement; ``device="cpu"`` (fp32, host clock, no kernels) only
    exercises the plumbing, for tests.
    """
    _check_device(device)
    if peak_flops is not None and not peak_flops > 0:
        raise ValueError(f"peak_flops must be a positive FLOP/s figure or None, got {peak_flops!r}")
    if use_kernels not in (True, False):
        raise ValueError(f"use_kernels must be True or False, got {use_kernels!r}")
    if not isinstance(steps, int) or not isinstance(warmup, int) or not 0 <= warmup < steps:
        raise ValueError(f"warmup must be an integer in [0, steps), got warmup={warmup!r}, steps={steps!r}")
    import lightning as L
    import torch

    from lightning_scaling.callbacks import FlopCounter

    gpt = load_example_gpt()
    if use_kernels and not gpt.kernels_available():
        raise RuntimeError("the Triton kernels do not load here (they need CUDA and lightning_scaling.kernels)")
    cuda = device == "cuda"
    L.seed_everything(0, verbose=False)
    model = gpt.GPTLightningModule(_gpt_config(gpt, shape), warmup_steps=min(10, steps), use_kernels=use_kernels)
    train, _ = gpt.make_dataloaders(shape.seq_len, shape.batch_size, max_bytes=corpus_bytes)
    counter = FlopCounter(peak_flops=peak_flops)
    boundaries = _make_step_boundary_callback(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    _trainer([counter, boundaries], steps, shape.accumulate, device).fit(model, train)
    fit_seconds = time.perf_counter() - started

    seconds = boundaries.step_seconds()
    metrics = boundaries.metrics
    window = int(getattr(counter, "window", FLOPCOUNTER_DEFAULT_WINDOW))
    peak = hardware_peak()
    if peak_flops is not None:
        peak = {**peak, "override_flops": peak_flops}
    palm = analytic_flops_per_step(shape, "palm")
    chinchilla = analytic_flops_per_step(shape, "chinchilla")
    peak_flops = peak_flops if peak_flops is not None else peak["peak_bf16_flops"]
    timed = seconds[warmup:]
    last = metrics.get(max(metrics), {}) if metrics else {}
    compared = compare_with_hand(seconds, metrics, palm, peak_flops, window, first_step=warmup + 1)
    result: dict[str, Any] = {
        "kernels": use_kernels,
        "device": device,
        "shape": asdict(shape),
        "steps": len(seconds),
        "warmup_steps": warmup,
        "window_steps": window,
        "tokens_per_step": shape.tokens_per_step,
        "fit_seconds": fit_seconds,
        "step_seconds_median": statistics.median(timed) if timed else None,
        "analytic_flops_per_step_palm": palm,
        "analytic_flops_per_step_chinchilla": chinchilla,
        "final_loss": last.get("train/loss"),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "hand_mfu_median_step": (palm / statistics.median(timed) / peak_flops) if (peak_flops and timed) else None,
        **compared,
    }
    result["peak"] = peak
    del model, train
    if cuda:
        torch.cuda.empty_cache()
    return result


def _short_location(filename: str, lineno: int) -> str:
    path = Path(filename)
    parts = path.parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            parts = parts[parts.index(anchor) + 1 :]
            break
    else:
        try:
            parts = path.resolve().relative_to(REPO).parts
        except ValueError:
            parts = parts[-3:]
    return f"{'/'.join(parts)}:{lineno}"


def count_host_syncs(
    with_monitor: bool, shape: RunShape = SYNC_SHAPE, steps: int = 60, warmup: int = 10, device: str = "cuda"
) -> dict[str, Any]:
    """Synchronising CUDA calls per optimizer step after ``warmup`` steps, with or without ScalingMonitor.

    Two counts: ``torch.cuda.set_sync_debug_mode("warn")`` warnings (grouped by the source line that triggered
    them) and, from ``torch.profiler``, the CUDA runtime's ``*Synchronize`` calls (which also sees explicit
    ``torch.cuda.synchronize()``). The example GPT uses our kernels when they load, as it does by default.
    ``device="cpu"`` only exercises the plumbing (nothing synchronises there), for tests.
    """
    _check_device(device)
    if with_monitor not in (True, False):
        raise ValueError(f"with_monitor must be True or False, got {with_monitor!r}")
    if not isinstance(steps, int) or not isinstance(warmup, int) or not 0 <= warmup < steps:
        raise ValueError(f"warmup must be an integer in [0, steps), got warmup={warmup!r}, steps={steps!r}")
    import inspect

    import lightning as L
    import torch
    from lightning.pytorch import Callback

    gpt = load_example_gpt()
    records: list[tuple[str, str, int]] = []  # (message, filename, line) of every warning during the fit
    ends: list[int] = [0]  # len(records) at the start of training and at the end of each optimizer step
    profiler_counts: dict[str, int] = {}
    profiler_error: list[str] = []
    profiler_read: list[bool] = []  # one True once the profiler's window was read

    def record_warning(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        records.append((str(message), filename, lineno))

    class SyncWindow(Callback):
        def __init__(self) -> None:
            self.profiler: Any = None
            self._last_step = 0

        def _start_profiler(self) -> None:
            try:
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
                self.profiler = profile(activities=activities)
                self.profiler.start()
            except Exception as err:  # noqa: BLE001 - the warning count still stands
                profiler_error.append(f"{type(err).__name__}: {err}")
                self.profiler = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            ends[0] = len(records)
            if warmup == 0:
                self._start_profiler()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == self._last_step:
                return
            self._last_step = trainer.global_step
            ends.append(len(records))
            if trainer.global_step == warmup:
                self._start_profiler()
            if trainer.global_step == trainer.max_steps:
                self._stop_profiler()  # the same steps as the warnings: not the end-of-fit hooks

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._stop_profiler()

        def _stop_profiler(self) -> None:
            if self.profiler is None:
                return
            profiler, self.profiler = self.profiler, None
            try:
                profiler.stop()
                for event in profiler.key_averages():
                    if "Synchronize" in event.key:
                        profiler_counts[event.key] = profiler_counts.get(event.key, 0) + int(event.count)
                profiler_read.append(True)
            except Exception as err:  # noqa: BLE001
                profiler_error.append(f"{type(err).__name__}: {err}")

    callbacks: list[Any] = [SyncWindow()]
    if with_monitor:
        from lightning_scaling.callbacks import ScalingMonitor

        options: dict[str, Any] = {"tokens_fn": target_tokens}
        if "report" in inspect.signature(ScalingMonitor).parameters:
            options["report"] = False  # no report file written into the checkout
        callbacks.insert(0, ScalingMonitor(**options))
    L.seed_everything(0, verbose=False)
    model = gpt.GPTLightningModule(
        _gpt_config(gpt, shape), warmup_steps=min(10, steps), use_kernels=device == "cuda" and gpt.kernels_available()
    )
    train, _ = gpt.make_dataloaders(shape.seq_len, shape.batch_size, max_bytes=2_000_000)
    trainer = _trainer(callbacks, steps, shape.accumulate, device)
    cuda = device == "cuda"
    previous_mode = torch.cuda.get_sync_debug_mode() if cuda else 0
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record_warning
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.fit(model, train)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(previous_mode)
    is_sync = [SYNC_WARNING_TEXT in message for message, _, _ in records]
    # ends[k] = warnings so far at the end of optimizer step k; steps warmup+1 .. last are counted
    per_step = [sum(is_sync[ends[k - 1] : ends[k]]) for k in range(warmup + 1, len(ends))]
    start, end = (ends[warmup], ends[-1]) if len(ends) > warmup else (0, 0)
    locations: dict[str, int] = {}
    for (_, filename, lineno), sync in zip(records[start:end], is_sync[start:end], strict=True):
        if sync:
            key = _short_location(filename, lineno)
            locations[key] = locations.get(key, 0) + 1
    other = sorted(
        {message.splitlines()[0][:160] for (message, _, _), s in zip(records, is_sync, strict=True) if not s}
    )
    timed_steps = max(len(per_step), 1)
    return {
        "monitor": with_monitor,
        "device": device,
        "shape": asdict(shape),
        "kernels": device == "cuda" and bool(gpt.kernels_available()),
        "steps_counted": len(per_step),
        "micro_batches_per_step": shape.accumulate,
        "sync_warnings_per_step_mean": sum(per_step) / timed_steps,
        "sync_warnings_per_step_max": max(per_step, default=0),
        "sync_warnings_by_location": dict(sorted(locations.items(), key=lambda kv: -kv[1])),
        "profiler_synchronize_calls": profiler_counts,
        "profiler_synchronize_per_step": (sum(profiler_counts.values()) / timed_steps) if profiler_read else None,
        "profiler_error": profiler_error[0] if profiler_error else None,
        "other_warnings": other[:10],
    }


# ------------------------------------------------------------------------------------------------ printing


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "n/a"
    return format(value * scale, spec)


def _print_markdown_table(header: list[str], rows: list[list[str]]) -> None:
    from _table import print_table  # benchmarks/ is on sys.path when run as a script

    print_table(header, rows, markdown=True)


def _mfu_report(
    results: list[dict[str, Any]], errors: dict[str, str], matmul_flops: float | None = None
) -> dict[str, Any]:
    peak = next((r["peak"] for r in results), None)
    known = peak["peak_bf16_flops"] if peak else None
    print(BEGIN_MARK)
    if peak:
        print(
            f"Hardware table: `{peak['device_name']}` -> `{peak['table_key']}`, dense bf16 peak "
            f"{_fmt(known, '.1f', 1e-12)} TFLOP/s (Lightning's own table: "
            f"{_fmt(peak['lightning_peak_bf16_flops'], '.1f', 1e-12)} TFLOP/s)."
        )
    if matmul_flops:
        share = f" = {matmul_flops / known:.2f} of the table's peak" if known else ""
        print(
            f"A bf16 8192x8192x8192 matmul (torch, random inputs, mean of 10) runs at "
            f"{matmul_flops / 1e12:.1f} TFLOP/s on this device{share}: the practical ceiling for MFU."
        )
    print()
    header = [
        "kernels",
        "steps",
        "step ms (median)",
        "FLOPs/step callback",
        "FLOPs/step PaLM",
        "FLOPs/step Chinchilla",
        "TFLOP/s callback",
        "TFLOP/s measured",
        "MFU callback",
        "MFU hand",
        "callback / hand",
        "FLOP ratio",
        "time ratio",
        "MFU hand (median step)",
        "final loss",
        "peak GiB",
    ]
    rows = []
    for r in results:
        rows.append(
            [
                "on" if r["kernels"] else "off",
                str(r["steps"]),
                _fmt(r["step_seconds_median"], ".2f", 1e3),
                _fmt(r["callback_flops_per_step"], ".4g"),
                _fmt(r["analytic_flops_per_step_palm"], ".4g"),
                _fmt(r["analytic_flops_per_step_chinchilla"], ".4g"),
                _fmt(r["callback_flops_per_sec"], ".1f", 1e-12),
                _fmt(r["measured_flops_per_sec"], ".1f", 1e-12),
                _fmt(r["callback_mfu"], ".4f"),
                _fmt(r["hand_mfu_window"], ".4f"),
                _fmt(r["mfu_ratio_callback_over_hand"], ".4f"),
                _fmt(r["flops_ratio_callback_over_analytic"], ".4f"),
                _fmt(r["time_ratio_measured_over_callback"], ".4f"),
                _fmt(r["hand_mfu_median_step"], ".4f"),
                _fmt(r["final_loss"], ".3f"),
                _fmt(r["peak_memory_gib"], ".1f"),
            ]
        )
    if rows:
        _print_markdown_table(header, rows)
    for name, err in errors.items():
        print(f"\n{name if name == 'matmul ceiling' else 'kernels ' + name}: FAILED: {err}")
    if results:
        r0 = results[0]
        clock = "CUDA-event" if r0["device"] == "cuda" else "host-clock"
        print(
            f"\nShape: {r0['shape']}; {r0['tokens_per_step']} tokens per optimizer step; "
            f"{'bf16-mixed' if r0['device'] == 'cuda' else 'fp32 on the CPU (plumbing check, not a measurement)'}. "
            f"MFU hand = analytic PaLM FLOPs per step (lightning_scaling.flops, causal attention as half) / "
            f"{clock} step time / dense peak, over the callback's {r0['window_steps']}-step window ending at the "
            "last step (the callback's metrics are read once, after training: reading them during training "
            "would synchronise with the device). callback / hand = FLOP ratio (callback FLOPs per step / "
            f"analytic) x time ratio ({clock} step time / step time implied by the callback's FLOP/s). "
            f"MFU hand (median step): the median step after {r0['warmup_steps']} warm-up steps instead of the "
            "window mean."
        )
    print(END_MARK)
    parts = []
    for r in results:
        ratio = r.get("mfu_ratio_callback_over_hand")
        gap = "n/a" if ratio is None else f"{100 * (ratio - 1):+.1f}%"
        parts.append(
            f"kernels {'on' if r['kernels'] else 'off'}: MFU {_fmt(r['callback_mfu'], '.3f')} callback vs "
            f"{_fmt(r.get('hand_mfu_window'), '.3f')} hand ({gap})"
        )
    parts += [f"{name if name == 'matmul ceiling' else 'kernels ' + name}: failed" for name in errors]
    if peak:
        parts.append(f"peak {peak['table_key']} {_fmt(peak['peak_bf16_flops'], '.0f', 1e-12)} TFLOP/s")
    if matmul_flops:
        parts.append(f"matmul {matmul_flops / 1e12:.0f} TFLOP/s")
    summary = "; ".join(parts)
    return {
        "summary": summary,
        "runs": results,
        "errors": errors,
        "matmul_bf16_flops": matmul_flops,
        "ok": bool(results) and not errors,
    }


def _syncs_report(results: list[dict[str, Any]], errors: dict[str, str]) -> dict[str, Any]:
    print(BEGIN_MARK)
    header = [
        "callbacks",
        "kernels",
        "steps counted",
        "sync warnings / step (mean)",
        "max",
        "profiler *Synchronize / step",
        "top sources",
    ]
    rows = []
    for r in results:
        top = ", ".join(f"{loc} ×{n}" for loc, n in list(r["sync_warnings_by_location"].items())[:4]) or "none"
        rows.append(
            [
                "ScalingMonitor" if r["monitor"] else "none",
                "on" if r["kernels"] else "off",
                str(r["steps_counted"]),
                f"{r['sync_warnings_per_step_mean']:.2f}",
                str(r["sync_warnings_per_step_max"]),
                _fmt(r["profiler_synchronize_per_step"], ".2f"),
                top,
            ]
        )
    if rows:
        _print_markdown_table(header, rows)
    for r in results:
        if r["profiler_error"]:
            print(f"\nprofiler ({'monitor' if r['monitor'] else 'none'}): {r['profiler_error']}")
    for name, err in errors.items():
        print(f"\n{name}: FAILED: {err}")
    if results:
        r0 = results[0]
        print(
            f"\nShape: {r0['shape']}; {r0['micro_batches_per_step']} micro-batches per optimizer step; "
            f"{r0['steps_counted']} steps counted after the warm-up. Warnings: "
            "torch.cuda.set_sync_debug_mode('warn'), by the source line that triggered them; profiler: the CUDA "
            "runtime's *Synchronize calls over the same steps (explicit torch.cuda.synchronize() included)."
        )
    print(END_MARK)
    by_name = {("monitor" if r["monitor"] else "none"): r for r in results}
    if "none" in by_name and "monitor" in by_name:
        added = by_name["monitor"]["sync_warnings_per_step_mean"] - by_name["none"]["sync_warnings_per_step_mean"]
        summary = (
            f"ScalingMonitor adds {added:.2f} syncs per optimizer step (none "
            f"{by_name['none']['sync_warnings_per_step_mean']:.2f}, monitor "
            f"{by_name['monitor']['sync_warnings_per_step_mean']:.2f})"
        )
    else:
        summary = "incomplete: " + "; ".join(f"{k} failed" for k in errors)
    return {"summary": summary, "runs": results, "errors": errors, "ok": len(results) == 2 and not errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mfu = sub.add_parser("mfu", help="MFU with kernels on and off, callback vs hand computation")
    mfu.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    mfu.add_argument("--warmup", type=int, default=10, help="steps left out of the median (default 10)")
    syncs = sub.add_parser("syncs", help="host synchronisations per optimizer step, ScalingMonitor on vs off")
    syncs.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    syncs.add_argument("--warmup", type=int, default=10, help="steps not counted (default 10)")
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error(f"--steps must be a positive integer, got {args.steps}")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be at least 0 and below --steps ({args.steps}), got {args.warmup}")

    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_mfu: no CUDA GPU is available here; this measurement needs an NVIDIA GPU. Nothing measured.",
            file=sys.stderr,
        )
        return 2
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    results: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    if args.command == "mfu":
        for name, flag in (("on", True), ("off", False)):
            try:
                results.append(measure_mfu(flag, steps=args.steps, warmup=args.warmup))
            except Exception as err:  # noqa: BLE001 - report it and measure the other run
                errors[name] = f"{type(err).__name__}: {err}"
        try:
            matmul = matmul_ceiling()
        except Exception as err:  # noqa: BLE001
            errors["matmul ceiling"] = f"{type(err).__name__}: {err}"
            matmul = None
        report = _mfu_report(results, errors, matmul)
    else:
        for name, flag in (("none", False), ("monitor", True)):
            try:
                results.append(count_host_syncs(flag, steps=args.steps, warmup=args.warmup))
            except Exception as err:  # noqa: BLE001
                errors[name] = f"{type(err).__name__}: {err}"
        report = _syncs_report(results, errors)
    print(RESULT_PREFIX + json.dumps(report, default=str), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
