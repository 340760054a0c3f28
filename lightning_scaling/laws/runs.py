"""Reading runs for the fitter: CSV tables of (params, tokens or FLOPs, loss) and Lightning ``CSVLogger``
run directories whose ``metrics.csv`` carries ``scaling/tokens`` and ``scaling/params`` (logged by the
``TokenBudget`` callback). Stdlib ``csv`` only; no pandas."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lightning_scaling import metric_names
from lightning_scaling.argument_checks import one_of
from lightning_scaling.laws.fitting import ScalingPoints

# Candidate column names, first match wins (case-insensitive). Includes the Chinchilla digitised CSV of
# Besiroglu et al. 2024 ("Model Size", "Training FLOP", "loss") and Sardana et al. 2023's ("Parameters",
# "Tokens", "Smoothed Loss").
PARAMS_COLUMNS = ("params", "parameters", "n", "model size", "model_size", metric_names.PARAMS, "num_params")
TOKENS_COLUMNS = ("tokens", "d", "training tokens", "train_tokens", metric_names.TOKENS, "num_tokens")
FLOPS_COLUMNS = ("flops", "c", "training flop", "training flops", "compute", metric_names.FLOPS)
LOSS_COLUMNS = ("loss", "smoothed loss", "final loss", "val/loss", "val_loss", "train/loss", "train_loss")
RUN_COLUMNS = ("run", "run_id")

# CSVLogger metrics: the loss column preferred when none is named
LOGGER_LOSS_COLUMNS = ("val/loss", "val_loss", "train/loss", "train_loss", "loss")
LOGGER_TOKENS = metric_names.TOKENS
LOGGER_PARAMS = metric_names.PARAMS


def _find(header: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, path: Path) -> str | None:
    """The column for ``what``: ``wanted`` when given (an error if the header lacks it), else the first of
    ``candidates`` in the header (case-insensitive), else None."""
    lower = {h.strip().lower(): h for h in header}
    if wanted is not None:
        if wanted in header:
            return wanted
        if wanted.strip().lower() in lower:
            return lower[wanted.strip().lower()]
        raise ValueError(f"{path}: no column {wanted!r} for {what}; columns are {', '.join(header)}")
    for name in candidates:
        if name in lower:
            return lower[name]
    return None


def _pick(header: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, path: Path) -> str:
    """:func:`_find` for a column the file must have."""
    column = _find(header, wanted, candidates, what, path)
    if column is None:
        raise ValueError(
            f"{path}: no {what} column (looked for {', '.join(map(repr, candidates))}); "
            f"columns are {', '.join(header)}; name it with the {what}_column option"
        )
    return column


def _number(text: str, column: str, line: int, path: Path) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{path}, line {line}: column {column!r} holds {text!r}, not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{path}, line {line}: column {column!r} must be a finite number > 0, got {text!r}")
    return value


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    except (csv.Error, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable CSV file: {err}") from None
    if not header:
        raise ValueError(f"{path} is empty (no header row)")
    return header, rows


def read_csv(
    path: str | Path,
    *,
    params_column: str | None = None,
    tokens_column: str | None = None,
    flops_column: str | None = None,
    loss_column: str | None = None,
    run_column: str | None = None,
) -> ScalingPoints:
    """Points from a CSV with one row per run (or per logged step with ``run_column``).

    Columns are found by name (case-insensitive) unless given: parameters (``params``, ``Parameters``,
    ``Model Size``, …), tokens (``tokens``, ``Tokens``, …) or FLOPs (``flops``, ``Training FLOP``, …; then
    D = C/(6N)), loss in nats (``loss``, ``Smoothed Loss``, …). Rows with an empty loss are skipped; any other
    empty or non-positive value is an error naming the line and column."""
    path = Path(path)
    header, rows = _rows(path)
    p_col = _pick(header, params_column, PARAMS_COLUMNS, "params", path)
    l_col = _pick(header, loss_column, LOSS_COLUMNS, "loss", path)
    t_col = _find(header, tokens_column, TOKENS_COLUMNS, "tokens", path)
    f_col = _find(header, flops_column, FLOPS_COLUMNS, "flops", path)
    if t_col is None and f_col is None:
        raise ValueError(f"{path}: needs a tokens or a flops column; columns are {', '.join(header)}")
    r_col = None if run_column is None else _pick(header, run_column, RUN_COLUMNS, "run", path)
    n, d, c, loss, runs = [], [], [], [], []
    for line, row in enumerate(rows, start=2):
        if not (row.get(l_col) or "").strip():
            continue
        n.append(_number(row.get(p_col, ""), p_col, line, path))
        loss.append(_number(row[l_col], l_col, line, path))
        if t_col is not None:
            d.append(_number(row.get(t_col, ""), t_col, line, path))
        if f_col is not None:
            c.append(_number(row.get(f_col, ""), f_col, line, path))
        runs.append(f"{path}:{row[r_col] if r_col else line}")
    if not loss:
        raise ValueError(f"{path}: no rows with a value in the loss column {l_col!r}")
    return ScalingPoints.from_arrays(n, d if t_col else None, loss, flops=c if f_col else None, runs=runs)


def read_csv_logger(
    path: str | Path,
    *,
    loss_column: str | None = None,
    points: str = "final",
    params_column: str = LOGGER_PARAMS,
    tokens_column: str = LOGGER_TOKENS,
) -> ScalingPoints:
    """Points from Lightning ``CSVLogger`` runs under ``path``: every ``metrics.csv`` below it is one run.

    Tokens and parameters come from ``scaling/tokens`` and ``scaling/params`` (the ``TokenBudget``
    callback), carried forward to later rows since Lightning writes each logged metric on its own step
    row. ``loss_column`` defaults to the first of val/loss, val_loss, train/loss, train_loss, loss present.
    ``points="final"`` keeps each run's last loss; ``"all"`` keeps every logged loss (training curves, for
    approach 1)."""
    path = Path(path)
    points = one_of("points", points, ("final", "all"))
    files = [path] if path.is_file() else sorted(path.rglob("metrics.csv"))
    if not files:
        raise ValueError(f"{path}: no metrics.csv found (expected CSVLogger run directories)")
    n, d, loss, runs = [], [], [], []
    for file in files:
        header, rows = _rows(file)
        l_col = _pick(header, loss_column, LOGGER_LOSS_COLUMNS, "loss", file)
        for col in (params_column, tokens_column):
            if col not in header:
                raise ValueError(
                    f"{file}: no {col!r} column; log it with the TokenBudget callback "
                    f"(lightning_scaling.callbacks.TokenBudget); columns are {', '.join(header)}"
                )
        tokens = params = None
        run_points = []
        for line, row in enumerate(rows, start=2):
            if (row.get(tokens_column) or "").strip():
                tokens = _number(row[tokens_column], tokens_column, line, file)
            if (row.get(params_column) or "").strip():
                params = _number(row[params_column], params_column, line, file)
            if (row.get(l_col) or "").strip() and tokens is not None and params is not None:
                run_points.append((params, tokens, _number(row[l_col], l_col, line, file)))
        if not run_points:
            raise ValueError(f"{file}: no row has {l_col!r} after {tokens_column!r} and {params_column!r} were logged")
        for p, t, ell in run_points[-1:] if points == "final" else run_points:
            n.append(p)
            d.append(t)
            loss.append(ell)
            runs.append(str(file.parent))
    return ScalingPoints.from_arrays(n, d, loss, runs=runs)


def read_points(
    paths: Sequence[str | Path],
    *,
    params_column: str | None = None,
    tokens_column: str | None = None,
    flops_column: str | None = None,
    loss_column: str | None = None,
    run_column: str | None = None,
    points: str = "final",
) -> ScalingPoints:
    """Points from several CSV files and/or CSVLogger directories, concatenated."""
    if not paths:
        raise ValueError("paths must name at least one CSV file or CSVLogger directory")
    parts = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"path {str(path)!r} does not exist")
        if path.is_dir() or path.name == "metrics.csv":
            parts.append(
                read_csv_logger(
                    path,
                    loss_column=loss_column,
                    points=points,
                    **({"params_column": params_column} if params_column else {}),
                    **({"tokens_column": tokens_column} if tokens_column else {}),
                )
            )
        else:
            parts.append(
                read_csv(
                    path,
                    params_column=params_column,
                    tokens_column=tokens_column,
                    flops_column=flops_column,
                    loss_column=loss_column,
                    run_column=run_column,
                )
            )
    if len(parts) == 1:
        return parts[0]
    return ScalingPoints(
        *(np.concatenate([getattr(p, k) for p in parts]) for k in ("params", "tokens", "loss", "flops", "runs"))
    )
