"""``lightning-scaling fit``: fit a scaling law to a ladder of runs (CSV files or CSVLogger directories).

Imports numpy (and matplotlib with --plot) only when it runs; never torch or Lightning.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

_EPILOG = """\
PATH is a CSV (one row per run: params, tokens or flops, loss; column names are found automatically or
given with --*-column) or a directory of Lightning CSVLogger runs (every metrics.csv below it is one run,
with scaling/tokens and scaling/params from the TokenBudget callback).
--out writes {law..., "fit": {...}}, which `lightning-scaling plan --law-file` and the callbacks' law= read;
approaches 1 and 2 give exponents only, no law, so --out needs --approach 3 or kaplan.
examples:
  lightning-scaling fit runs.csv --approach 3 --bootstrap 200 --out fitted.json
  lightning-scaling fit lightning_logs/ --approach 2 --plot fit.png
  lightning-scaling fit chinchilla.csv --drop-highest-loss 5 --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``fit`` flags on ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument("paths", nargs="+", metavar="PATH", help="CSV file(s) or CSVLogger run directories")
    parser.add_argument(
        "--approach",
        choices=("1", "2", "3", "kaplan"),
        default="3",
        help="1: training-curve envelope; 2: isoFLOP parabolas; 3: Chinchilla L(N, D) (default); "
        "kaplan: Kaplan 2020 L(N, D)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="resample runs N times for percentile intervals (default 0: none)",
    )
    parser.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default 0.95)")
    parser.add_argument(
        "--budget",
        type=float,
        metavar="C",
        help="FLOPs at which to report the optimum (default: the largest budget in the data)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="PNG", help="write isoFLOP, contour and predicted-vs-observed plots")
    parser.add_argument("--out", metavar="JSON", help="write the fitted law for `plan --law-file`")
    data = parser.add_argument_group("reading the runs")
    data.add_argument("--params-column", help="parameter count column (default: params, Parameters, Model Size, ...)")
    data.add_argument("--tokens-column", help="training tokens column (default: tokens, Tokens, ...)")
    data.add_argument("--flops-column", help="training FLOPs column, used when there is no tokens column (D = C/6N)")
    data.add_argument(
        "--loss-column", help="loss column, nats (default: loss, Smoothed Loss, val/loss, train/loss, ...)"
    )
    data.add_argument("--run-column", help="column naming the run of each row (CSV with several rows per run)")
    data.add_argument(
        "--points",
        choices=("final", "all"),
        help="CSVLogger: each run's final loss, or every logged step (default: all for approach 1)",
    )
    data.add_argument(
        "--drop-highest-loss",
        type=int,
        default=0,
        metavar="K",
        help="drop the K highest-loss points first (Besiroglu et al. 2024 drop 5)",
    )
    data.add_argument(
        "--budget-tolerance",
        type=float,
        default=0.1,
        help="approach 2: runs whose FLOPs agree within this fraction share a budget (default 0.1)",
    )


def _fit(args: argparse.Namespace, points: Any) -> Any:
    from lightning_scaling.laws import fitting as F

    if args.approach == "1":
        return F.fit_approach1(points)
    if args.approach == "2":
        return F.fit_approach2(points, budget_tolerance=args.budget_tolerance)
    if args.approach == "3":
        return F.fit_approach3(points)
    return F.fit_kaplan(points)


def _sources(args: argparse.Namespace) -> str:
    names = [str(p) for p in args.paths]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _columns_chosen(args: argparse.Namespace) -> str:
    """ " (with --loss-column 'x')" when the user picked columns: a fit that fails may owe it to that choice."""
    chosen = [f"{flag} {value!r}" for flag, value in _column_flags(args) if value is not None]
    return f" (with {', '.join(chosen)})" if chosen else ""


def _column_flags(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    return [
        ("--params-column", args.params_column),
        ("--tokens-column", args.tokens_column),
        ("--flops-column", args.flops_column),
        ("--loss-column", args.loss_column),
        ("--run-column", args.run_column),
    ]


def _check_flags(args: argparse.Namespace) -> None:
    """Reject bad flags before reading or fitting anything (a fit can take seconds), naming each flag."""
    from lightning_scaling.argument_checks import fraction, positive_float

    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be a whole number >= 0, got {args.bootstrap}")
    if args.seed < 0:
        raise ValueError(f"--seed must be a whole number >= 0, got {args.seed}")
    if args.drop_highest_loss < 0:
        raise ValueError(f"--drop-highest-loss must be a whole number >= 0, got {args.drop_highest_loss}")
    fraction("--confidence", args.confidence, inclusive_high=False)
    positive_float("--budget-tolerance", args.budget_tolerance)
    if args.budget is not None:
        positive_float("--budget", args.budget)
    for flag, value in _column_flags(args):
        if value is not None and not value.strip():
            raise ValueError(f"{flag} must name a column, got an empty name")
    if args.out and args.approach in ("1", "2"):
        raise ValueError(
            f"--out needs a loss law; approach {args.approach} gives only the exponents a and b "
            "(use --approach 3 or kaplan)"
        )
    for flag, value in (("--out", args.out), ("--plot", args.plot)):
        if value is None:
            continue
        target = Path(value)
        if not value.strip() or target.is_dir():
            raise ValueError(f"{flag} {value!r} must name a file to write, not a directory")
        if not target.parent.is_dir():
            raise ValueError(f"{flag} {value!r} cannot be written: the folder {str(target.parent)!r} does not exist")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'lightning-scaling[plot]'") from None


def _read(args: argparse.Namespace, points_mode: str) -> Any:
    """The runs, with a column error blamed on the --*-column flag that asked for the column."""
    from lightning_scaling.laws.runs import read_points

    try:
        return read_points(
            args.paths,
            params_column=args.params_column,
            tokens_column=args.tokens_column,
            flops_column=args.flops_column,
            loss_column=args.loss_column,
            run_column=args.run_column,
            points=points_mode,
        )
    except ValueError as err:
        for flag, value in _column_flags(args):
            if value is not None and f"{value!r}" in str(err):
                raise ValueError(f"{flag} {value!r}: {err}") from None
        raise


def _budget_said(args: argparse.Namespace, budget: float) -> str:
    if args.budget is not None:
        return f"--budget {budget:g}"
    return f"the largest budget in the runs ({budget:.3g} FLOPs; choose another with --budget)"


def _check_budget(args: argparse.Namespace, points: Any, budget: float, optimum: dict[str, float]) -> list[str]:
    """Refuse an optimum of under one parameter or one token per parameter; warn when --budget lies more than
    EXTRAPOLATION_MARGIN times outside the FLOPs of the runs."""
    from lightning_scaling.laws.definitions import EXTRAPOLATION_MARGIN
    from lightning_scaling.planner import MIN_PARAMS, MIN_TOKENS_PER_PARAM

    n, d = optimum.get("n_opt"), optimum.get("d_opt")
    if n is not None and d is not None and not (n >= MIN_PARAMS and d >= MIN_TOKENS_PER_PARAM * n):
        raise ValueError(
            f"{_budget_said(args, budget)}: the fitted optimum would be {n:.3g} parameters on "
            f"{d:.3g} tokens, and advice needs at least {MIN_PARAMS:g} parameter and {MIN_TOKENS_PER_PARAM:g} "
            f"token per parameter; give a --budget near the runs' FLOPs ({float(points.flops.min()):.3g} to "
            f"{float(points.flops.max()):.3g})"
        )
    lo, hi = float(points.flops.min()), float(points.flops.max())
    if budget < lo / EXTRAPOLATION_MARGIN or budget > hi * EXTRAPOLATION_MARGIN:
        return [
            (
                f"--budget {budget:.3g} FLOPs lies more than {EXTRAPOLATION_MARGIN:g}x outside the runs' FLOPs "
                f"({lo:.3g} to {hi:.3g}): the optimum there is an extrapolation of the fit"
            )
        ]
    return []


def _finite_or_none(value: Any) -> Any:
    """The report with NaN and inf replaced by None (null), so that every JSON reader can read it."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _report(args: argparse.Namespace, points: Any, result: Any, budget: float, boot: Any) -> dict[str, Any]:
    from lightning_scaling.laws.fitting import optimum_at

    report: dict[str, Any] = {
        "fit": result.to_dict(),
        "law": None if result.law is None else result.law.to_dict(),
        "budget": budget,
        "optimum": optimum_at(result, budget),
        "n_points": len(points),
        "n_runs": len(set(points.runs.tolist())),
    }
    if boot is not None:
        report["bootstrap"] = boot.to_dict()
    return report


def _print_table(report: dict[str, Any], approach: str) -> None:
    fit = report["fit"]
    intervals = report.get("bootstrap", {}).get("intervals", {})
    conf = report.get("bootstrap", {}).get("confidence")
    title = {
        "1": "approach 1 (envelope)",
        "2": "approach 2 (isoFLOP parabolas)",
        "3": "approach 3 (Chinchilla L(N, D))",
        "kaplan": "Kaplan L(N, D)",
    }[approach]
    print(f"{title}: {report['n_points']} points from {report['n_runs']} runs")
    header = f"  {'':<14}{'value':>14}"
    if intervals:
        header += f"   {round(conf * 100)}% interval"
    print(header)
    rows = dict(fit.get("parameters", {}))
    rows.update(a=fit["a"], b=fit["b"])
    labels = {"n_opt": "N_opt (params)", "d_opt": "D_opt (tokens)", "loss_opt": "loss at opt"}
    for key, value in list(rows.items()) + [(k, v) for k, v in report["optimum"].items()]:
        line = f"  {labels.get(key, key):<14}{value:>14.5g}"
        if key in intervals:
            lo, hi = intervals[key]
            line += f"   [{lo:.5g}, {hi:.5g}]"
        print(line)
    print(f"  (optimum at C = {report['budget']:.3g} FLOPs; a, b: N_opt ∝ C^a, D_opt ∝ C^b)")
    if "objective" in fit:
        print(f"  objective {fit['objective']:.6g}")
    for note in fit.get("skipped", []):
        print(f"  skipped budget {note}")


def run(args: argparse.Namespace) -> int:
    """Read the runs, fit, print; exit status 0, or ValueError (exit 2) on bad input."""
    from lightning_scaling.laws.resampling import bootstrap

    _check_flags(args)
    points_mode = args.points or ("all" if args.approach == "1" else "final")
    points = _read(args, points_mode)
    if args.drop_highest_loss >= len(points):
        raise ValueError(f"--drop-highest-loss {args.drop_highest_loss} would leave no points: there are {len(points)}")
    points = points.drop_highest_loss(args.drop_highest_loss)
    budget = float(points.flops.max()) if args.budget is None else float(args.budget)
    try:  # degenerate runs (constant loss, one model size, ...) are the data's fault: exit 2, one line
        result = _fit(args, points)
    except ValueError as err:
        raise ValueError(f"cannot fit {_sources(args)}{_columns_chosen(args)}: {err}") from None
    boot = None
    if args.bootstrap:
        kwargs = {"budget_tolerance": args.budget_tolerance} if args.approach == "2" else {}
        try:
            boot = bootstrap(
                points,
                args.approach,
                args.bootstrap,
                budget=budget,
                confidence=args.confidence,
                seed=args.seed,
                fit=result,
                **kwargs,
            )
        except ValueError as err:
            raise ValueError(f"--bootstrap {args.bootstrap}: {err}") from None
    try:
        report = _report(args, points, result, budget, boot)
    except ValueError as err:
        raise ValueError(f"{_budget_said(args, budget)}: {err}") from None
    report["warnings"] = _check_budget(args, points, budget, report["optimum"])
    for message in report["warnings"]:
        print(f"lightning-scaling fit: warning: {message}", file=sys.stderr)
    if args.out:
        fitted_range = {
            "params": [float(points.params.min()), float(points.params.max())],
            "tokens": [float(points.tokens.min()), float(points.tokens.max())],
            "source": f"the runs in {_sources(args)}",
        }
        out = {
            **result.law.to_dict(),
            "fit": {
                **report["fit"],
                "sources": [str(p) for p in args.paths],
                "budget": budget,
                "optimum": report["optimum"],
                "fitted_range": fitted_range,
            },
        }
        if boot is not None:
            out["fit"]["intervals"] = boot.to_dict()["intervals"]
            out["fit"]["confidence"] = boot.confidence
        try:
            Path(args.out).write_text(json.dumps(_finite_or_none(out), indent=2, allow_nan=False) + "\n")
        except OSError as err:
            raise ValueError(f"--out {args.out!r} cannot be written: {err.strerror or err}") from None
    if args.plot:
        from lightning_scaling.laws.plotting import plot_fit

        try:
            plot_fit(points, result, args.plot, budget_tolerance=args.budget_tolerance)
        except ValueError as err:
            raise ValueError(f"--plot {args.plot!r}: {err}") from None
    if args.json:
        print(json.dumps(_finite_or_none(report), indent=2, allow_nan=False))
    else:
        _print_table(report, args.approach)
        if args.out:
            print(f"wrote {args.out}; plan with: lightning-scaling plan --law-file {args.out} --flops <C>")
        if args.plot:
            print(f"wrote {args.plot}")
    return 0
