"""``lightning-scaling fit``: fit a scaling law to a ladder of runs (CSV files or CSVLogger directories).

Imports numpy/scipy (and matplotlib with --plot) only when it runs; never torch or Lightning.
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--approach", choices=("1", "2", "3", "kaplan"), default="3",
                        help="1: training-curve envelope; 2: isoFLOP parabolas; 3: Chinchilla L(N, D) (default); "
                             "kaplan: Kaplan 2020 L(N, D)")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="resample runs N times for percentile intervals (default 0: none)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default 0.95)")
    parser.add_argument("--budget", type=float, metavar="C",
                        help="FLOPs at which to report the optimum (default: the largest budget in the data)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="PNG", help="write isoFLOP, contour and predicted-vs-observed plots")
    parser.add_argument("--out", metavar="JSON", help="write the fitted law for `plan --law-file`")
    data = parser.add_argument_group("reading the runs")
    data.add_argument("--params-column", help="parameter count column (default: params, Parameters, Model Size, ...)")
    data.add_argument("--tokens-column", help="training tokens column (default: tokens, Tokens, ...)")
    data.add_argument("--flops-column", help="training FLOPs column, used when there is no tokens column (D = C/6N)")
    data.add_argument("--loss-column", help="loss column, nats (default: loss, Smoothed Loss, val/loss, train/loss, ...)")
    data.add_argument("--run-column", help="column naming the run of each row (CSV with several rows per run)")
    data.add_argument("--points", choices=("final", "all"),
                      help="CSVLogger: each run's final loss, or every logged step (default: all for approach 1)")
    data.add_argument("--drop-highest-loss", type=int, default=0, metavar="K",
                      help="drop the K highest-loss points first (Besiroglu et al. 2024 drop 5)")
    data.add_argument("--budget-tolerance", type=float, default=0.1,
                      help="approach 2: runs whose FLOPs agree within this fraction share a budget (default 0.1)")


def _fit(args: argparse.Namespace, points: Any) -> Any:
    from lightning_scaling import fit as F

    if args.approach == "1":
        return F.fit_approach1(points)
    if args.approach == "2":
        return F.fit_approach2(points, budget_tolerance=args.budget_tolerance)
    if args.approach == "3":
        return F.fit_approach3(points)
    return F.fit_kaplan(points)


def _report(args: argparse.Namespace, points: Any, result: Any, budget: float, boot: Any) -> dict[str, Any]:
    from lightning_scaling.fit import _optimum_of

    report: dict[str, Any] = {"fit": result.to_dict(), "law": None if result.law is None else result.law.to_dict(),
                              "budget": budget, "optimum": _optimum_of(result, budget), "n_points": len(points),
                              "n_runs": len(set(points.runs.tolist()))}
    if boot is not None:
        report["bootstrap"] = boot.to_dict()
    return report


def _print_table(report: dict[str, Any], approach: str) -> None:
    fit = report["fit"]
    intervals = report.get("bootstrap", {}).get("intervals", {})
    conf = report.get("bootstrap", {}).get("confidence")
    title = {"1": "approach 1 (envelope)", "2": "approach 2 (isoFLOP parabolas)", "3": "approach 3 (Chinchilla L(N, D))",
             "kaplan": "Kaplan L(N, D)"}[approach]
    print(f"{title}: {report['n_points']} points from {report['n_runs']} runs")
    header = f"  {'':<14}{'value':>14}"
    if intervals:
        header += f"   {int(round(conf * 100))}% interval"
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
    from lightning_scaling import fit as F
    from lightning_scaling._validation import fraction, non_negative_float, positive_float
    from lightning_scaling.fit_io import read_points

    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be a whole number >= 0, got {args.bootstrap}")
    fraction("--confidence", args.confidence, inclusive_high=False)
    positive_float("--budget-tolerance", args.budget_tolerance)
    non_negative_float("--drop-highest-loss", args.drop_highest_loss)
    if args.out and args.approach in ("1", "2"):
        raise ValueError(f"--out needs a loss law; approach {args.approach} gives only the exponents a and b "
                         "(use --approach 3 or kaplan)")
    points_mode = args.points or ("all" if args.approach == "1" else "final")
    points = read_points(args.paths, params_column=args.params_column, tokens_column=args.tokens_column,
                         flops_column=args.flops_column, loss_column=args.loss_column, run_column=args.run_column,
                         points=points_mode)
    points = points.drop_highest_loss(args.drop_highest_loss)
    budget = float(points.flops.max()) if args.budget is None else positive_float("--budget", args.budget)
    result = _fit(args, points)
    boot = None
    if args.bootstrap:
        kwargs = {"budget_tolerance": args.budget_tolerance} if args.approach == "2" else {}
        boot = F.bootstrap(points, args.approach, args.bootstrap, budget=budget, confidence=args.confidence,
                           seed=args.seed, fit=result, **kwargs)
    report = _report(args, points, result, budget, boot)
    if args.out:
        out = {**result.law.to_dict(), "fit": {**report["fit"], "sources": [str(p) for p in args.paths],
                                                "budget": budget, "optimum": report["optimum"]}}
        if boot is not None:
            out["fit"]["intervals"] = boot.to_dict()["intervals"]
            out["fit"]["confidence"] = boot.confidence
        try:
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        except OSError as err:
            raise ValueError(f"--out {args.out!r} cannot be written: {err}") from None
    if args.plot:
        from lightning_scaling.plotting import plot_fit

        plot_fit(points, result, args.plot, budget_tolerance=args.budget_tolerance)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        _print_table(report, args.approach)
        if args.out:
            print(f"wrote {args.out}; plan with: lightning-scaling plan --law-file {args.out} --flops <C>")
        if args.plot:
            print(f"wrote {args.plot}")
    return 0
