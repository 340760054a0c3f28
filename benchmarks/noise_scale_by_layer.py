"""Why does the normalization layers' noise scale read about half the whole model's? Exact per-example gradients
of every parameter, by layer group, against both estimates GradientNoiseScale reports, on the same model states
and the same sequences.

benchmarks/noise_scale_agreement.py finds the norm-layer B_simple (Gray et al. 2024, arXiv 2411.00999) at about
0.5x the whole-model B_simple from gradient accumulation (McCandlish et al. 2018, arXiv 1812.06162, App. A.1) on
the example GPT. Either the norm parameters' own noise scale differs from the whole model's, or one estimator is
off. This script tells the two apart.

1. It trains the example GPT (examples/gpt.py; the set-up of noise_scale_agreement.py: micro-batches of 16
   sequences of 128 bytes, ``accumulate_grad_batches=2``, AdamW 3e-3 with warm-up and a cosine over
   ``--schedule-steps``, clipping 1.0, ``GradientNoiseScale(ema_decay=0.95)`` on every step) and keeps the model
   at the ``--checkpoints`` steps, with the callback's two live (smoothed) estimates there.
2. At each kept state, on one fixed set of ``--probe-batches`` x ``--probe-size`` training sequences, it forms
   every sequence's own gradient of every parameter (``torch.func``: ``functional_call`` + ``vmap(grad)``), the
   loss of a sequence being the mean over its bytes, so that a micro-batch's loss is the mean of its sequences'.
   Per parameter group, with g_i the sequence gradients and Ḡ their mean over n sequences, the unbiased pair
   (B_small = 1, B_big = n; McCandlish 2018, App. A.1) is

       |G|² ≈ (n·|Ḡ|² − mean_i |g_i|²) / (n − 1)        tr(Σ) ≈ (mean_i |g_i|² − |Ḡ|²) / (1 − 1/n)

   and B_simple = tr(Σ)/|G|². "pooled" uses all sequences as one batch (the most precise); the jackknife standard
   error leaves out one probe batch at a time; [min–max] is over the probe batches of ``--probe-size``, each
   estimated alone. Groups: every parameter; the normalization layers (weights and biases of every layer that
   NormLayerProbe finds, i.e. what the library measures), their weights and biases apart; the token embedding
   (tied to the output head); the position embedding; attention (qkv, proj); the MLP (gate, up, down); and all but
   the tied embedding/head (the total of Gray et al.'s released analysis code, which leaves tied weights out). The
   whole model's B_simple is Σ tr(Σ_g) / Σ |G_g|² over the groups: the groups' B_simple weighted by their share of
   |G|², so the share columns say which groups set it.
3. Library on the same state and sequences: the sequences replayed in order through ``Trainer.fit`` with the
   learning rate at 0 (no update), micro-batches of ``--micro-batch``, ``accumulate_grad_batches=--accumulate`` and
   ``GradientNoiseScale(norm_layers_every_n_steps=1)`` with a smoothing so slow (decay 1 − 1e-9) that its
   bias-corrected averages are plain means over the replayed steps. Beside it, the same two estimators (micro-batch
   vs accumulation window over all parameters; one sequence vs micro-batch over the norm parameters) evaluated from
   the exact per-sequence gradients of the same sequences in the same order: a correct library reproduces them to
   float precision, whatever the sampling noise.

The "library live in training" rows are the callback's smoothed estimates at that step: ratios of moving
averages over the steps before it, which weight each step by its |G|². While |G|² falls fast (the first ~100 steps
here) they lag the state's own B_simple several-fold; they are shown for reference, not compared.

The last lines, per size: the norm/whole ratio of the exact estimates at each state, of the library's replay, and
the largest relative difference between the replay and the same estimators on exact gradients (a correct library:
float rounding, about 1e-5 or less).

    python benchmarks/noise_scale_by_layer.py                       # d_model 64, about 3 minutes on one busy core
    python benchmarks/noise_scale_by_layer.py --d-models 64,128     # both sizes of noise_scale_agreement.py (10 min)
    python benchmarks/noise_scale_by_layer.py --quick               # checkpoints 0 and 20, 4 probe batches
    python benchmarks/noise_scale_by_layer.py --markdown --threads 2
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from _example import example_gpt, start_lightning_benchmark
from _table import print_table
from torch.utils.data import DataLoader, Dataset, Subset

WHOLE = "all parameters"
NORM = "norm layers (weights + biases)"
# table order; PARTITION splits the model, the two norm sub-groups split NORM, the last row is WHOLE less one group
GROUPS = (
    WHOLE,
    NORM,
    "  norm weights",
    "  norm biases",
    "token embedding (= tied head)",
    "position embedding",
    "attention (qkv, proj)",
    "MLP (gate, up, down)",
    "all but the tied embedding/head",
)
PARTITION = (
    NORM,
    "token embedding (= tied head)",
    "position embedding",
    "attention (qkv, proj)",
    "MLP (gate, up, down)",
)
REPLAY_DECAY = 1.0 - 1e-9  # GradientNoiseScale's smoothing in the replay: bias-corrected, a plain mean


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-models", default="64", help="comma-separated model widths, one run each (default: 64)")
    p.add_argument(
        "--checkpoints",
        default="0,50,200",
        help="optimizer steps at which to study the model, comma-separated (default: 0,50,200)",
    )
    p.add_argument(
        "--schedule-steps",
        type=int,
        default=250,
        help="length of the learning-rate schedule, as in noise_scale_agreement.py (default: 250); training "
        "stops at the last checkpoint",
    )
    p.add_argument("--probe-batches", type=int, default=8, help="probe batches per model state (default: 8)")
    p.add_argument("--probe-size", type=int, default=64, help="sequences per probe batch (default: 64)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128, help="bytes per sequence")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch (training and replay)")
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step (>= 2)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (the example's)")
    p.add_argument("--ema-decay", type=float, default=0.95, help="GradientNoiseScale's smoothing while training")
    p.add_argument("--corpus-bytes", type=int, default=4_000_000, help="bytes of the embedded corpus to read")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="checkpoints 0 and 20, 4 probe batches: a smoke run")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = p.parse_args(argv)
    if args.quick:
        args.checkpoints, args.probe_batches = "0,20", 4
    for name in ("schedule_steps", "probe_batches", "n_layer", "n_head", "seq_len", "micro_batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.accumulate < 2:
        p.error(f"--accumulate must be at least 2 (two batch sizes for the whole model), got {args.accumulate}")
    if args.micro_batch < 2:
        p.error(f"--micro-batch must be at least 2 (one sequence against the micro-batch), got {args.micro_batch}")
    window = args.micro_batch * args.accumulate
    if args.probe_size < window or args.probe_size % window:
        p.error(
            f"--probe-size must be a positive multiple of --micro-batch x --accumulate ({window}), so that the "
            f"replay's accumulation windows fall inside one probe batch; got {args.probe_size}"
        )
    if not 0 < args.ema_decay < 1:
        p.error(f"--ema-decay must be in (0, 1), got {args.ema_decay}")
    try:
        args.widths = [int(w) for w in args.d_models.split(",") if w.strip()]
        args.steps = sorted({int(s) for s in args.checkpoints.split(",") if s.strip()})
    except ValueError:
        p.error(
            f"--d-models and --checkpoints take comma-separated whole numbers, got {args.d_models!r}, "
            f"{args.checkpoints!r}"
        )
    if not args.widths or any(w < 1 or w % args.n_head for w in args.widths):
        p.error(f"--d-models must list positive multiples of --n-head ({args.n_head}), got {args.d_models!r}")
    if not args.steps or args.steps[0] < 0 or args.steps[-1] >= args.schedule_steps:
        p.error(
            f"--checkpoints must be steps in [0, --schedule-steps) = [0, {args.schedule_steps}), "
            f"got {args.checkpoints!r}"
        )
    return args


# ------------------------------------------------------------------------------------------------------- groups
def parameter_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter names (as ``model.named_parameters()`` gives them, tied ones once) per group of GROUPS."""
    from lightning_scaling.callbacks._norm_layers import NormLayerProbe

    probe = NormLayerProbe()
    probe.find(model)
    norm_modules = {name for name, _ in probe.layers}  # exactly the layers the library measures
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name, _ in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        groups[WHOLE].append(name)
        if owner != "tok":  # Gray et al.'s analysis code leaves the tied embedding/head out of its total
            groups["all but the tied embedding/head"].append(name)
        if owner in norm_modules:
            groups[NORM].append(name)
            groups["  norm weights" if leaf == "weight" else "  norm biases"].append(name)
        elif owner == "tok":
            groups["token embedding (= tied head)"].append(name)
        elif owner == "pos":
            groups["position embedding"].append(name)
        elif ".attn." in f".{name}":
            groups["attention (qkv, proj)"].append(name)
        elif ".mlp." in f".{name}":
            groups["MLP (gate, up, down)"].append(name)
        else:
            raise SystemExit(f"parameter {name!r} belongs to no group; extend parameter_groups()")
    covered = sorted(n for g in PARTITION for n in groups[g])
    if covered != sorted(groups[WHOLE]):
        raise SystemExit("the parameter groups do not partition the model's parameters")
    return groups


# -------------------------------------------------------------------------------------------- exact statistics
def unbiased_pair(mean_example_sq: float, batch_sq: float, n: int) -> tuple[float, float]:
    """(|G|², tr(Σ)) from mean_i |g_i|² (B = 1) and |Ḡ|² (B = n): McCandlish 2018, App. A.1."""
    return (n * batch_sq - mean_example_sq) / (n - 1), (mean_example_sq - batch_sq) / (1.0 - 1.0 / n)


def ratio(grad_sq: float, trace_cov: float) -> float:
    return trace_cov / grad_sq if grad_sq > 0 else math.nan


def line_through(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line y = |G|² + tr(Σ)·x through (x = 1/B, y = |G_B|²) points: (intercept, slope)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


@dataclass
class ExactStats:
    """Per group: Σ_i |g_i|² and Σ_i g_i per probe batch (kept per batch for the jackknife), and the library's two
    estimators evaluated on the same sequences (their per-step lines, averaged)."""

    sizes: list[int] = field(default_factory=list)
    example_sq: dict[str, list[float]] = field(default_factory=dict)  # group -> per batch Σ_i |g_i|²
    grad_sums: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per batch: param -> Σ_i g_i
    accumulation_lines: list[tuple[float, float]] = field(default_factory=list)  # all parameters, per window
    norm_lines: list[tuple[float, float]] = field(default_factory=list)  # norm layers, per micro-batch
    loss: list[float] = field(default_factory=list)


def exact_statistics(
    model: torch.nn.Module, groups: dict[str, list[str]], batches: list[torch.Tensor], micro: int, accumulate: int
) -> ExactStats:
    """Every sequence's gradient of every parameter (vmap over sequences), reduced per group."""
    from torch.func import functional_call, grad, vmap

    model.eval()  # no dropout in the example; eval() keeps any from breaking vmap's randomness rules
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sequence_loss(p: dict[str, torch.Tensor], seq: torch.Tensor) -> torch.Tensor:
        x, y = seq[None, :-1], seq[None, 1:]
        logits = functional_call(model, p, (x,))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    per_sequence = vmap(grad(sequence_loss), in_dims=(None, 0))
    stats = ExactStats(example_sq={g: [] for g in GROUPS})
    for batch in batches:
        stats.loss.append(_batch_loss(model, batch))
        g = per_sequence(params, batch)  # name -> [n, *shape]
        n = batch.shape[0]
        sq = {name: t.reshape(n, -1).double().square().sum(1) for name, t in g.items()}  # [n] per parameter
        for group, names in groups.items():
            stats.example_sq[group].append(float(sum(sq[name].sum() for name in names)))
        stats.grad_sums.append({name: t.double().sum(0) for name, t in g.items()})
        stats.sizes.append(n)
        # the library's two estimators on these sequences, in replay order
        norm_names = groups[NORM]
        for w in range(n // (micro * accumulate)):
            micro_means = []
            for j in range(accumulate):
                lo = (w * accumulate + j) * micro
                mean = {name: t[lo : lo + micro].double().mean(0) for name, t in g.items()}
                micro_means.append(mean)
                # norm layers: one sequence (B = 1) against the micro-batch (B = micro)
                example = float(sum(sq[name][lo : lo + micro].mean() for name in norm_names))
                batch_sq = float(sum(mean[name].square().sum() for name in norm_names))
                stats.norm_lines.append(line_through([(1.0, example), (1.0 / micro, batch_sq)]))
            # all parameters: each micro-batch (B = micro) against the window (B = micro x accumulate)
            points = [(1.0 / micro, float(sum(m[name].square().sum() for name in m))) for m in micro_means]
            window = {name: sum(m[name] for m in micro_means) / accumulate for name in micro_means[0]}
            points.append((1.0 / (micro * accumulate), float(sum(v.square().sum() for v in window.values()))))
            stats.accumulation_lines.append(line_through(points))
    return stats


def _batch_loss(model: torch.nn.Module, batch: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(batch[:, :-1])
        return float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)))


@dataclass
class GroupEstimate:
    grad_sq: float  # pooled unbiased |G|² (loss units per parameter unit, squared)
    trace_cov: float  # pooled unbiased tr(Σ), per sequence
    b_simple: float  # pooled, in sequences
    stderr: float  # jackknife over the probe batches, in sequences
    per_batch: list[float]  # each probe batch alone (NaN where its |G|² estimate is not positive)


def pooled_estimates(stats: ExactStats, groups: dict[str, list[str]]) -> dict[str, GroupEstimate]:
    """Per group: the unbiased pair over all probe sequences as one batch, its jackknife error and the per-batch
    estimates."""
    total_n = sum(stats.sizes)
    total_sum = {name: torch.stack([s[name] for s in stats.grad_sums]).sum(0) for name in stats.grad_sums[0]}

    def estimate(names: list[str], example_sq: float, sums: dict[str, torch.Tensor], n: int) -> tuple[float, ...]:
        batch_sq = float(sum((sums[name] / n).square().sum() for name in names))
        g2, tr = unbiased_pair(example_sq / n, batch_sq, n)
        return g2, tr, ratio(g2, tr)

    out = {}
    m = len(stats.sizes)
    for group, names in groups.items():
        sq = stats.example_sq[group]
        g2, tr, b = estimate(names, sum(sq), total_sum, total_n)
        leave_out = []
        for i in range(m):
            rest = {name: total_sum[name] - stats.grad_sums[i][name] for name in names}
            leave_out.append(estimate(names, sum(sq) - sq[i], rest, total_n - stats.sizes[i])[2])
        finite = [v for v in leave_out if math.isfinite(v)]
        se = math.nan
        if len(finite) == m and m > 1:
            mean = sum(finite) / m
            se = math.sqrt((m - 1) / m * sum((v - mean) ** 2 for v in finite))
        per_batch = [estimate(names, sq[i], stats.grad_sums[i], stats.sizes[i])[2] for i in range(m)]
        out[group] = GroupEstimate(g2, tr, b, se, per_batch)
    return out


def mean_line(lines: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(|G|², tr(Σ), B_simple) from per-step lines averaged with equal weights (the replay's smoothing)."""
    g2 = sum(a for a, _ in lines) / len(lines)
    tr = sum(b for _, b in lines) / len(lines)
    return g2, tr, ratio(g2, tr)


# ------------------------------------------------------------------------------------------- training & replay
def _trainer(args: argparse.Namespace, max_steps: int, callbacks: list[Any]) -> Any:
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=1.0,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )


def _noise_scale(ema_decay: float) -> Any:
    from lightning_scaling.callbacks.gradient_noise_scale import GradientNoiseScale

    # measures only (no batch warnings), the norm layers on every step so that both sources see the same steps
    return GradientNoiseScale(
        ema_decay=ema_decay,
        warmup_steps=10**9,
        norm_layers_every_n_steps=1,
        tokens_fn=lambda batch: batch[:, 1:].numel(),
    )


def _check_both_sources(gns: Any, where: str) -> None:
    if gns.mode != "hooks" or not gns.norm_layers_found:
        raise SystemExit(
            f"{where}: expected both noise-scale sources on, got mode {gns.mode!r}, norm layers "
            f"{gns.norm_layers_found or 'none'} ({gns.summary()['status']})"
        )


@dataclass
class Checkpoint:
    step: int
    state: dict[str, torch.Tensor]
    live_whole: float  # GradientNoiseScale's smoothed estimates while training, in sequences
    live_norm: float


def train(gpt: Any, args: argparse.Namespace, cfg: Any) -> tuple[list[Checkpoint], Any, float]:
    """Train as noise_scale_agreement.py does, keeping the model at the checkpoint steps; stops after the last."""
    import lightning as L

    L.seed_everything(args.seed, verbose=False)
    module = gpt.GPTLightningModule(
        cfg, lr=args.lr, warmup_steps=min(50, args.schedule_steps // 10 + 1), use_kernels=False
    )
    loader, _ = gpt.make_dataloaders(args.seq_len, args.micro_batch, max_bytes=args.corpus_bytes)
    gns = _noise_scale(args.ema_decay)
    wanted = set(args.steps)
    kept: list[Checkpoint] = []

    class Keeper(L.Callback):
        def _keep(self, trainer: Any, pl_module: Any) -> None:
            step = trainer.global_step
            if step in wanted and all(c.step != step for c in kept):
                whole, norm = gns.estimate().b_simple, gns.norm_estimator.b_simple
                state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
                kept.append(Checkpoint(step, state, whole, norm))
            if step >= max(wanted):
                trainer.should_stop = True

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._keep(trainer, pl_module)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *rest: Any) -> None:
            self._keep(trainer, pl_module)

    trainer = _trainer(args, args.schedule_steps, [gns, Keeper()])
    L.seed_everything(args.seed, verbose=False)  # the same micro-batches in the same order at every width
    start = time.perf_counter()
    if max(wanted) > 0:
        trainer.fit(module, loader)
    else:  # only the initial state
        kept.append(Checkpoint(0, copy.deepcopy(module.state_dict()), math.nan, math.nan))
    if max(wanted) > 0:
        _check_both_sources(gns, f"d_model {cfg.d_model}, training")
    return kept, loader.dataset, time.perf_counter() - start


@dataclass
class Replay:
    whole: tuple[float, float, float]  # (|G|², tr(Σ), B_simple) of the whole-model (accumulation) source
    norm: tuple[float, float, float]  # the same for the norm-layer source
    steps: int
    unchanged: bool  # the learning rate of 0 left every parameter as it was


def library_replay(
    gpt: Any, args: argparse.Namespace, cfg: Any, state: dict[str, torch.Tensor], sequences: Dataset[torch.Tensor]
) -> Replay:
    """GradientNoiseScale on ``sequences`` (in order) at the model state ``state``: Trainer.fit with lr 0."""

    module = gpt.GPTLightningModule(cfg, lr=0.0, warmup_steps=1, use_kernels=False)
    module.load_state_dict(state)
    gns = _noise_scale(REPLAY_DECAY)
    steps = len(sequences) // (args.micro_batch * args.accumulate)  # type: ignore[arg-type]
    trainer = _trainer(args, steps, [gns])
    trainer.fit(module, DataLoader(sequences, batch_size=args.micro_batch, shuffle=False))
    _check_both_sources(gns, f"d_model {cfg.d_model}, replay")
    unchanged = all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    w, n = gns.estimator, gns.norm_estimator
    if w.count != steps or n.count != steps:
        raise SystemExit(f"replay: expected {steps} measured steps, got {w.count} and {n.count}")
    return Replay((w.grad_sq, w.trace_cov, w.b_simple), (n.grad_sq, n.trace_cov, n.b_simple), steps, unchanged)


# ------------------------------------------------------------------------------------------------------- output
def _b(value: float, stderr: float = math.nan) -> str:
    if not math.isfinite(value):
        return "n/a"
    digits = 2 if abs(value) < 10 else 1
    return f"{value:.{digits}f}" + (f" ± {stderr:.{digits}f}" if math.isfinite(stderr) else "")


def _spread(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    text = f"{statistics.mean(finite):.2f} [{min(finite):.2f}–{max(finite):.2f}]"
    missing = len(values) - len(finite)
    return text + (f" ({missing} n/a)" if missing else "")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start_lightning_benchmark("noise_scale_by_layer.py", argv)
    n_probe = args.probe_batches * args.probe_size
    print(
        f"example GPT, {args.n_layer} layers, seq {args.seq_len} bytes; training: micro-batch {args.micro_batch} x "
        f"accumulate {args.accumulate}, AdamW peak lr {args.lr:g} over a {args.schedule_steps}-step schedule, "
        f"GradientNoiseScale(ema_decay={args.ema_decay:g}); checkpoints {args.steps}; probe: {args.probe_batches} "
        f"batches x {args.probe_size} = {n_probe} training sequences (seed {args.seed + 1}); B_simple in sequences",
        flush=True,
    )
    gpt = example_gpt()
    summary = []
    verdicts = []
    for d_model in args.widths:
        cfg = gpt.GPTConfig(
            n_layer=args.n_layer, n_head=args.n_head, d_model=d_model, d_ff=4 * d_model, seq_len=args.seq_len
        )
        print(f"\nd_model {d_model}: training to step {args.steps[-1]} ...", flush=True)
        checkpoints, dataset, seconds = train(gpt, args, cfg)
        pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed + 1))[:n_probe]
        probe = Subset(dataset, pick.tolist())
        batches = list(torch.stack([probe[i] for i in range(n_probe)]).split(args.probe_size))
        print(f"  trained in {seconds:.0f} s; probing {len(checkpoints)} states ...", flush=True)

        table, compare = [], []
        exact_ratios, replay_ratios, worst = [], [], 0.0
        for cp in checkpoints:
            start = time.perf_counter()
            model = gpt.GPT(cfg)
            model.load_state_dict({k.removeprefix("model."): v for k, v in cp.state.items()})
            groups = parameter_groups(model)
            stats = exact_statistics(model, groups, batches, args.micro_batch, args.accumulate)
            est = pooled_estimates(stats, groups)
            replay = library_replay(gpt, args, cfg, cp.state, probe)
            if not replay.unchanged:
                raise SystemExit("replay: the parameters changed at learning rate 0")
            print(f"  step {cp.step}: {time.perf_counter() - start:.0f} s", flush=True)
            whole = est[WHOLE]
            loss = statistics.mean(stats.loss)
            for group in GROUPS:
                e = est[group]
                params = sum(model.get_parameter(n).numel() for n in groups[group])
                table.append(
                    [
                        str(cp.step) if group == WHOLE else "",
                        f"{loss:.3f}" if group == WHOLE else "",
                        group,
                        f"{params:,}",
                        f"{e.grad_sq / whole.grad_sq:.3f}" if whole.grad_sq > 0 else "n/a",
                        f"{e.trace_cov / whole.trace_cov:.3f}",
                        _b(e.b_simple, e.stderr),
                        _spread(e.per_batch),
                        f"{e.b_simple / whole.b_simple:.2f}" if whole.b_simple > 0 else "n/a",
                    ]
                )
            emulated_whole = mean_line(stats.accumulation_lines)
            emulated_norm = mean_line(stats.norm_lines)
            agreement = max(
                _rel(a, b)
                for a, b in zip(emulated_whole[:2] + emulated_norm[:2], replay.whole[:2] + replay.norm[:2], strict=True)
            )
            worst = max(worst, agreement)
            exact_ratios.append(f"{est[NORM].b_simple / whole.b_simple:.2f}")
            replay_ratios.append(f"{replay.norm[2] / replay.whole[2]:.2f}")
            rows = [
                ("exact, pooled (1 vs all probe sequences)", whole.b_simple, est[NORM].b_simple, ""),
                (
                    (
                        f"library's estimators on the exact gradients ({args.micro_batch} vs "
                        f"{args.micro_batch * args.accumulate}; 1 vs {args.micro_batch})"
                    ),
                    emulated_whole[2],
                    emulated_norm[2],
                    "",
                ),
                (
                    f"library replay, same sequences, lr 0 ({replay.steps} steps)",
                    replay.whole[2],
                    replay.norm[2],
                    f"{agreement:.1e}",
                ),
                (f"library live in training (EMA {args.ema_decay:g})", cp.live_whole, cp.live_norm, ""),
            ]
            for i, (source, w, n, diff) in enumerate(rows):
                compare.append(
                    [
                        str(cp.step) if i == 0 else "",
                        source,
                        _b(w),
                        _b(n),
                        f"{n / w:.2f}" if w > 0 and math.isfinite(n) else "n/a",
                        diff,
                    ]
                )
            summary.append(
                [
                    str(d_model),
                    str(cp.step),
                    f"{loss:.3f}",
                    _b(whole.b_simple, whole.stderr),
                    _b(est[NORM].b_simple, est[NORM].stderr),
                    f"{est[NORM].b_simple / whole.b_simple:.2f}" if whole.b_simple > 0 else "n/a",
                    f"{replay.norm[2] / replay.whole[2]:.2f}" if replay.whole[2] > 0 else "n/a",
                    f"{cp.live_norm / cp.live_whole:.2f}" if cp.live_whole > 0 else "n/a",
                ]
            )

        at = ", ".join(str(cp.step) for cp in checkpoints)
        verdicts.append(
            f"d_model {d_model}, steps {at}: norm/whole exact {', '.join(exact_ratios)}; library replay "
            f"{', '.join(replay_ratios)}; replay vs the same estimators on exact gradients: max rel. diff "
            f"{worst:.1e}" + (" (MISMATCH: an estimator error)" if worst > 1e-3 else "")
        )
        params_total = sum(p.numel() for p in gpt.GPT(cfg).parameters())
        print(f"\nd_model {d_model} ({params_total / 1e6:.2f} M parameters): exact B_simple by parameter group")
        print_table(
            [
                "step",
                "probe loss (nats/byte)",
                "group",
                "parameters",
                "share of |G|²",
                "share of tr(Σ)",
                "B_simple pooled ± jackknife SE",
                f"per batch of {args.probe_size}: mean [min–max]",
                "/ whole",
            ],
            table,
            args.markdown,
        )
        print(f"\nd_model {d_model}: the library's two estimates on the same states")
        print_table(
            [
                "step",
                "source",
                "whole-model B_simple",
                "norm-layer B_simple",
                "ratio norm/whole",
                "replay vs the same estimators on exact gradients (max rel. diff of |G|², tr(Σ))",
            ],
            compare,
            args.markdown,
            align_right=False,
        )

    print("\nsummary: ratio of the norm layers' B_simple to the whole model's")
    print_table(
        [
            "d_model",
            "step",
            "probe loss",
            "exact whole B_simple",
            "exact norm B_simple",
            "exact ratio",
            "library replay ratio",
            "library live ratio",
        ],
        summary,
        args.markdown,
    )
    print()
    for line in verdicts:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
