"""``lightning-scaling plan``: compute-optimal model size and tokens for a budget, and what the run costs.

Imports the planner (numpy only) and never torch or Lightning, so it answers in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lightning_scaling.planner import DTYPES, FLOPS_CONVENTIONS

_EPILOG = """\
Fix the run with --flops, --params, --tokens (any two), --target-loss alone, or a model shape
(--n-layer --d-model --n-head --vocab-size --seq-len) in place of --params; the missing quantity is taken at
the law's optimum. Contradictory flags, non-positive, NaN or infinite numbers, and plans whose advice would be
under one parameter or one token per parameter exit with status 2. A plan outside the runs the law was fitted
on is printed with a warning on stderr.
examples:
  lightning-scaling plan --flops 1e21
  lightning-scaling plan --params 7e9 --tokens 2e12 --unique-tokens 5e11 --inference-tokens 1e13
  lightning-scaling plan --n-layer 12 --d-model 768 --n-head 12 --vocab-size 50257 --seq-len 1024 \\
      --flops 1e19 --gpu h100 --num-gpus 8 --batch-size 512 --json
"""

# flags whose values go straight to planner.plan (dest names equal its keyword names)
_PLAN_KEYS = (
    "flops",
    "params",
    "tokens",
    "target_loss",
    "n_layer",
    "d_model",
    "n_head",
    "vocab_size",
    "seq_len",
    "d_ff",
    "gated_mlp",
    "n_kv_head",
    "head_dim",
    "non_embedding",
    "flops_convention",
    "unique_tokens",
    "inference_tokens",
    "law",
    "law_file",
    "gpu",
    "num_gpus",
    "mfu",
    "peak_flops",
    "dtype",
    "batch_size",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``plan`` flags on ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    run = parser.add_argument_group("the run (give one or two)")
    run.add_argument("--flops", type=float, metavar="C", help="training compute budget, FLOPs")
    run.add_argument("--params", type=float, metavar="N", help="model parameters (total)")
    run.add_argument("--tokens", type=float, metavar="D", help="training tokens")
    run.add_argument(
        "--target-loss", type=float, metavar="L", help="target loss, nats/token: the cheapest run reaching it"
    )

    shape = parser.add_argument_group("model shape (instead of --params: analytic FLOPs per token instead of 6N)")
    shape.add_argument("--n-layer", type=int)
    shape.add_argument("--d-model", type=int)
    shape.add_argument("--n-head", type=int)
    shape.add_argument("--vocab-size", type=int)
    shape.add_argument("--seq-len", type=int, help="tokens per sequence (also sets tokens per step with --batch-size)")
    shape.add_argument("--d-ff", type=int, help="MLP width (default 4 x d_model)")
    shape.add_argument("--gated-mlp", action="store_true", help="SwiGLU-style MLP with three d x d_ff matrices")
    shape.add_argument("--n-kv-head", type=int, help="key/value heads, for grouped-query attention (default --n-head)")
    shape.add_argument("--head-dim", type=int, help="size of one head (default d_model / n_head)")
    shape.add_argument("--untied-embeddings", action="store_true", help="count a separate d x V output head")
    shape.add_argument("--non-embedding", action="store_true", help="feed non-embedding parameters to the law")
    shape.add_argument("--flops-convention", choices=FLOPS_CONVENTIONS, help="analytic FLOP count (default chinchilla)")

    extra = parser.add_argument_group("data, inference and the law")
    extra.add_argument("--unique-tokens", type=float, metavar="U", help="unique tokens available (repeated-data law)")
    extra.add_argument("--inference-tokens", type=float, metavar="T", help="tokens the model will serve after training")
    extra.add_argument(
        "--law",
        help="preset law: hoffmann (Hoffmann et al. 2022), besiroglu (Besiroglu et al. 2024, "
        "the default), muennighoff (Muennighoff et al. 2023)",
    )
    extra.add_argument("--law-file", metavar="PATH", help="JSON law written by `lightning-scaling fit`")

    hw = parser.add_argument_group("hardware (wall-clock and GPU-hours)")
    hw.add_argument("--gpu", metavar="NAME", help="h100, h100-pcie, h200, a100, l40s, b200, mi300x, ...")
    hw.add_argument("--num-gpus", type=int, metavar="G", help="number of GPUs (default 1)")
    hw.add_argument("--mfu", type=float, help="model FLOPs utilisation in (0, 1] (default 0.4)")
    hw.add_argument("--peak-flops", type=float, metavar="FLOP/S", help="dense peak per GPU, instead of --gpu")
    hw.add_argument("--dtype", choices=DTYPES, help="compute dtype for the --gpu peak (default bf16)")
    hw.add_argument("--batch-size", type=int, metavar="B", help="sequences per optimizer step (needs --seq-len)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1e5 or (value != 0 and abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"


def _table(result: dict[str, Any]) -> str:
    from lightning_scaling.run_report import format_percent  # "0%", "<0.1%", "5.1%": never "3.553e-13%"

    law = result["law"]
    rows: list[tuple[str, Any]] = [
        (
            "law",
            (
                f"{law['name'] or 'custom'} (E={law['E']:g}, A={law['A']:g}, B={law['B']:g}, "
                f"alpha={law['alpha']:g}, beta={law['beta']:g}; {law['source']})"
            ),
        ),
        ("mode", result["mode"]),
        ("parameters", result["params"]),
        ("training tokens", result["tokens"]),
        ("tokens per parameter", result["tokens_per_param"]),
        ("training FLOPs", result["flops"]),
        (f"FLOPs per token ({result['flops_convention']})", result["flops_per_token"]),
        ("predicted loss (nats/token)", result["loss"]),
        ("compute overhead vs same-loss optimum", format_percent(result["compute_overhead"])),
    ]
    best = result["compute_optimum"]
    rows.append(
        (
            "optimum for these FLOPs",
            f"{_fmt(best['params'])} params, {_fmt(best['tokens'])} tokens, loss {_fmt(best['loss'])}",
        )
    )
    if result["model"]:
        m = result["model"]
        rows.append(
            ("model parameters", f"{_fmt(m['total_params'])} total, {_fmt(m['non_embedding_params'])} non-embedding")
        )
    if result["data"]:
        dd = result["data"]
        opt = dd["optimum"]
        rows += [
            ("unique tokens", dd["unique_tokens"]),
            ("epochs", dd["epochs"]),
            ("effective tokens", dd["effective_tokens"]),
            ("effective parameters", dd["effective_params"]),
            ("loss with repetition", dd["loss"]),
            ("worth of last repeated token", dd["repetition_value"]),
            (
                "data-constrained optimum",
                (
                    f"{_fmt(opt['params'])} params, {_fmt(opt['tokens'])} tokens, "
                    f"{_fmt(opt['epochs'])} epochs, loss {_fmt(opt['loss'])}"
                ),
            ),
        ]
    if result["inference"]:
        inf = result["inference"]
        opt = inf["optimum"]
        rows += [
            ("inference tokens", inf["inference_tokens"]),
            ("training + inference FLOPs", inf["planned"]["total_flops"]),
            (
                "inference-aware optimum",
                f"{_fmt(opt['params'])} params, {_fmt(opt['tokens'])} tokens, {_fmt(opt['total_flops'])} FLOPs in all",
            ),
            ("it saves", f"{_fmt(inf['saved_flops'])} FLOPs ({format_percent(inf['saved_fraction'])})"),
        ]
    if result["hardware"]:
        hw = result["hardware"]
        device = f"{hw['num_gpus']} x {hw['gpu'] or 'custom'} ({_fmt(hw['peak_flops_per_gpu'])} FLOP/s peak)"
        rows += [
            ("hardware", f"{device} at MFU {hw['mfu']:g}"),
            ("wall-clock hours", hw["wall_clock_hours"]),
            ("GPU-hours", hw["gpu_hours"]),
        ]
    if result["batch"]:
        b = result["batch"]
        rows += [("tokens per step", b["tokens_per_step"]), ("steps", b["steps"])]
        if b["seconds_per_step"] is not None:
            rows.append(("seconds per step", b["seconds_per_step"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value if isinstance(value, str) else _fmt(value)}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    """Plan the run described by ``args``; print a table or one JSON object. Bad input raises ValueError."""
    from lightning_scaling.planner import plan

    kwargs = {key: getattr(args, key) for key in _PLAN_KEYS}
    result = plan(**kwargs, tied_embeddings=not args.untied_embeddings, cli_names=True)
    for message in result["warnings"]:  # also in the JSON; on stderr so that a person sees them either way
        print(f"lightning-scaling plan: warning: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        print(_table(result))
    sys.stdout.flush()
    return 0
