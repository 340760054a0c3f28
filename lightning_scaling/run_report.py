"""The end-of-fit run report: what :class:`~lightning_scaling.callbacks.ScalingMonitor` prints, writes as JSON
and draws.

Pure: it takes the parts' ``summary()`` dicts and the values the monitor records at its logging steps
(:class:`RunHistory`), and imports neither torch nor Lightning (matplotlib only to draw, and only when it is
installed), so that it can be built and checked without a Trainer.

The report has four groups, each with a short ``status``, a one-line ``verdict``, ``advice`` derived from the
numbers and ``cautions``:

- ``compute``: FLOPs, FLOP/s and model FLOPs utilisation (MFU, PaLM: Chowdhery et al. 2022, App. B);
- ``tokens``: tokens per parameter against the compute-optimal allocation of a Chinchilla-form law
  (Hoffmann et al. 2022, eq. 2 and 4), the compute overhead (de Vries 2023) and the compute-optimal run for the
  same FLOPs;
- ``batch_size``: the batch in use against the gradient noise scale B_simple (McCandlish et al. 2018);
- ``data``: epochs over the unique data and what repeats are worth (Muennighoff et al. 2023, eq. 5).

A law answers for any input, also far outside the runs it was fitted on. Where the run lies more than
``EXTRAPOLATION_MARGIN`` times outside a preset's fitted range the group is ``flagged``: the verdict is marked,
and the law's numbers appear as a caution, never as advice.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lightning_scaling import metric_names
from lightning_scaling.argument_checks import fraction, positive_float, positive_int

REPORT_VERSION = 1
GROUPS = ("compute", "tokens", "batch_size", "data")
MONITOR = "ScalingMonitor"  # the class whose options the advice names

# PaLM (Chowdhery et al. 2022), Table 3: 46.2% MFU for PaLM 540B, about 21% to 33% for the other large models listed.
GOOD_MFU = 0.40
LOW_MFU = 0.20

# The monitor's ``scaling/*`` metrics that the history keeps, under its own names (units in HISTORY_UNITS).
HISTORY_FROM_METRICS = {
    metric_names.TOKENS: "training_tokens",
    metric_names.TOKENS_PER_PARAM: "tokens_per_parameter",
    metric_names.PROJECTED_TOKENS_PER_PARAM: "projected_tokens_per_parameter",
    metric_names.GNS: "noise_scale_samples",
    metric_names.BATCH_SIZE: "batch_samples",
    metric_names.EPOCHS: "epochs",
    metric_names.PROJECTED_EPOCHS: "projected_epochs",
    metric_names.REPETITION_VALUE: "repetition_value",
    metric_names.MFU: "mfu",
}
HISTORY_UNITS = {
    "step": "optimizer steps",
    "training_tokens": "tokens",
    "tokens_per_parameter": "tokens per parameter",
    "projected_tokens_per_parameter": "tokens per parameter at the end of the run, as projected at this step",
    "training_loss": "the loss training_step returned, mean over the step's micro-batches and ranks",
    "noise_scale_samples": "samples",
    "batch_samples": "samples per optimizer step",
    "epochs": "epochs",
    "projected_epochs": "epochs at the end of the run, as projected at this step",
    "repetition_value": "fraction (worth of a repeated token against a fresh one)",
    "mfu": "fraction of the devices' dense peak FLOP/s",
}
HISTORY_COLUMNS = tuple(HISTORY_UNITS)


# ---------------------------------------------------------------------------------------------------- numbers
def format_count(value: float) -> str:
    """A count with an SI suffix: 1.1e6 -> "1.1M", 163840 -> "164k", 950 -> "950" (k, M, B, T)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def format_flops(value: float) -> str:
    """FLOPs in scientific notation without the plus sign: 1.127e12 -> "1.13e12"; under 1000 plainly."""
    if value == 0 or not math.isfinite(value) or abs(value) < 1e3:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{float(mantissa):.3g}e{int(exponent)}"


def format_percent(value: float) -> str:
    """A fraction as a percentage a person reads: 0 and rounding noise such as 3.6e-15 -> "0%", 0.0004 -> "<0.1%",
    0.0512 -> "5.1%", 9.83 -> "983%"."""
    percent = 100.0 * value
    if not math.isfinite(percent):
        return "?"
    if abs(percent) < 1e-9:  # floating-point noise of a computation whose answer is 0
        return "0%"
    if abs(percent) < 0.1:
        return "<0.1%" if percent > 0 else ">-0.1%"
    return f"{percent:.1f}%" if abs(percent) < 10 else f"{percent:.0f}%"


def format_duration(seconds: float) -> str:
    """A duration: 0.4 -> "under 1 s", 42 -> "42 s", 185 -> "3.1 min", 7300 -> "2.0 h"."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 1:
        return "under 1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _samples(value: float) -> str:
    """A batch size in samples: whole above one ("7"), else two digits ("0.42")."""
    return format_count(round(value)) if value >= 1 else f"{value:.2g}"


def _number(value: Any) -> float | None:
    """A finite float, or None (for None, NaN, inf, text)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


# ----------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ReportThresholds:
    """Where the verdicts change, as the parts' arguments of the same names set them.

    ``tokens_per_param``: the compute-optimal rule of thumb (Hoffmann et al. 2022, Table 3: about 20 tokens per
    parameter). ``overhead_threshold``: extra compute (a fraction) beyond which a run is no longer compute-optimal.
    ``overtrained_factor``: a run above this multiple of ``tokens_per_param`` is over-trained.
    ``batch_high_ratio`` / ``batch_low_ratio``: the batch in use against B_simple, above / below which the batch
    is called large / small. ``warn_epochs`` / ``stop_epochs``: epochs of diminishing returns / of repeats worth
    little (Muennighoff et al. 2023).
    """

    tokens_per_param: float = 20.0
    overhead_threshold: float = 0.10
    overtrained_factor: float = 5.0
    batch_high_ratio: float = 4.0
    batch_low_ratio: float = 0.25
    warn_epochs: float = 4.0
    stop_epochs: float = 40.0

    def __post_init__(self) -> None:
        for key in (
            "tokens_per_param",
            "overhead_threshold",
            "overtrained_factor",
            "batch_high_ratio",
            "warn_epochs",
            "stop_epochs",
        ):
            object.__setattr__(self, key, positive_float(key, getattr(self, key)))
        object.__setattr__(
            self, "batch_low_ratio", fraction("batch_low_ratio", self.batch_low_ratio, inclusive_high=False)
        )
        if self.stop_epochs <= self.warn_epochs:
            raise ValueError(f"stop_epochs must be > warn_epochs ({self.warn_epochs:g}), got {self.stop_epochs!r}")


class RunHistory:
    """The values behind the picture, one row per logging step: ``add(step, values)`` with ``values`` keyed by
    :data:`HISTORY_COLUMNS` (missing ones are NaN). At most ``max_points`` rows are kept: past that every other
    row is dropped, so a long run keeps its whole shape at a coarser step."""

    def __init__(self, max_points: int = 2048) -> None:
        self.max_points = positive_int("max_points", max_points)
        if self.max_points < 2:
            raise ValueError(f"max_points must be at least 2, got {max_points!r}")
        self._rows: list[tuple[float, ...]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, step: int, values: Mapping[str, Any]) -> None:
        """Record the values of optimizer step ``step`` (a later row for the same step replaces it)."""
        row = (float(step), *tuple(_nan(values.get(name)) for name in HISTORY_COLUMNS[1:]))
        if self._rows and self._rows[-1][0] == row[0]:
            self._rows[-1] = row
            return
        self._rows.append(row)
        if len(self._rows) > self.max_points:
            last = self._rows[-1]
            self._rows = self._rows[::2]
            if self._rows[-1] is not last:
                self._rows.append(last)

    def columns(self) -> dict[str, list[float | None]]:
        """Column name -> values, one per row (None where a value was missing); JSON-able."""
        out: dict[str, list[float | None]] = {name: [] for name in HISTORY_COLUMNS}
        for row in self._rows:
            for name, value in zip(HISTORY_COLUMNS, row, strict=True):
                out[name].append(value if math.isfinite(value) else None)
        return out


def _nan(value: Any) -> float:
    number = _number(value)
    return math.nan if number is None else number


def _column(history: Mapping[str, Sequence[Any]] | None, name: str) -> np.ndarray:
    if not history or name not in history:
        return np.zeros(0)
    return np.asarray([_nan(v) for v in history[name]], dtype=float)


# --------------------------------------------------------------------------------------------------- building
def build_run_report(
    summaries: Mapping[str, Mapping[str, Any] | None],
    history: Mapping[str, Sequence[Any]] | None = None,
    *,
    law: Any = None,
    data_law: Any = None,
    thresholds: ReportThresholds | None = None,
    training_seconds: float | None = None,
    planned_steps: int | None = None,
    report_path: str | None = None,
    picture_path: str | None = None,
    picture_note: str | None = None,
) -> dict[str, Any]:
    """The report as a JSON-able dict (keys and units: :func:`report_keys`).

    Args:
        summaries: each part's ``summary()`` under the monitor's part names ``"flops"``, ``"tokens"``,
            ``"noise_scale"``, ``"repetition"``; a missing or None entry is a part that was left out; a dict
            with only ``"error"`` is a part whose summary failed.
        history: :meth:`RunHistory.columns` (for the final training loss, and kept in the report for drawing).
        law: the Chinchilla-form law of the token verdict, or a preset name (default:
            ``lightning_scaling.laws.DEFAULT_LAW``).
        data_law: the data-constrained law of the data verdict (default: Muennighoff et al. 2023's C4 fit).
        thresholds: where the verdicts change (default: the parts' defaults).
        training_seconds: wall-clock seconds from train start to train end (validation included).
        planned_steps: optimizer steps the run was planned for (``trainer.estimated_stepping_batches``).
        report_path, picture_path: where the JSON and the PNG were written; ``picture_note`` says why there
            is no picture.
    """
    from lightning_scaling.laws import definitions as laws

    if not isinstance(summaries, Mapping):
        raise ValueError(f"summaries must be a dict of part name -> summary() dict, got {type(summaries).__name__}")
    thresholds = ReportThresholds() if thresholds is None else thresholds
    if not isinstance(thresholds, ReportThresholds):
        raise ValueError(f"thresholds must be a ReportThresholds, got {type(thresholds).__name__}")
    law = laws.DEFAULT_LAW if law is None else laws.get_law(law) if isinstance(law, str) else law
    data_law = laws.DataConstrainedLaw() if data_law is None else data_law
    if training_seconds is not None:
        training_seconds = _number(training_seconds)
    loss = _last(_column(history, "training_loss"))

    flops_s, tokens_s = summaries.get("flops"), summaries.get("tokens")
    noise_s, data_s = summaries.get("noise_scale"), summaries.get("repetition")
    params = _number((tokens_s or {}).get("params")) or _number((data_s or {}).get("params"))
    tokens = _number((tokens_s or {}).get("tokens"))
    if tokens is None:
        tokens = _number((data_s or {}).get("tokens"))
    steps = _number((flops_s or {}).get("optimizer_steps"))
    if steps is None and history:
        steps = _last(_column(history, "step"))

    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "run": {
            "parameters": params,
            "training_tokens": tokens,
            "optimizer_steps": None if steps is None else int(steps),
            "planned_optimizer_steps": planned_steps,
            "training_seconds": training_seconds,
            "final_training_loss": loss,
        },
        "compute": _guarded(_compute_group, "flops", flops_s, training_seconds),
        "tokens": _guarded(_tokens_group, "tokens", tokens_s, law, thresholds, loss),
        "batch_size": _guarded(_batch_group, "noise_scale", noise_s, thresholds),
        "data": _guarded(_data_group, "repetition", data_s, data_law, thresholds, params),
        "files": {"report": report_path, "picture": picture_path, "picture_note": picture_note},
        "thresholds": asdict(thresholds),
        "history": {name: list(values) for name, values in (history or {}).items()},
    }
    return _jsonable(report)


def _guarded(builder: Any, part: str, summary: Mapping[str, Any] | None, *args: Any) -> dict[str, Any]:
    if summary is None:
        return _group("off", f"not measured: the part is off ({MONITOR}({part}=False))")
    if set(summary) == {"error"}:
        return _group("error", f"no numbers: the part's summary failed ({summary['error']})")
    try:
        return builder(summary, *args)
    except Exception as err:  # noqa: BLE001 - one group's trouble must not cost the whole report
        return _group("error", f"no verdict: {type(err).__name__}: {err}")


def _group(
    status: str,
    verdict: str,
    advice: list[str] | None = None,
    cautions: list[str] | None = None,
    *,
    flagged: bool = False,
    numbers: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One group of the report: its verdict first, then its numbers."""
    return {
        "status": status,
        "verdict": verdict,
        "flagged": flagged,
        "advice": advice or [],
        "cautions": cautions or [],
        **(numbers or {}),
    }


def _last(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else None


def law_name(law: Any) -> str:
    """How messages name a law: "besiroglu law" for a named preset, else its class name ("ChinchillaLaw")."""
    name = getattr(law, "name", "") or ""
    return f"{name} law" if name else type(law).__name__


def _law_label(law: Any) -> str:
    return f"the {law_name(law)}"


def _law_record(law: Any) -> dict[str, Any]:
    from lightning_scaling.laws.definitions import fitted_range

    record = dict(law.to_dict()) if callable(getattr(law, "to_dict", None)) else {"name": type(law).__name__}
    found = fitted_range(law)
    record["fitted_range"] = None if found is None else found.to_dict()
    return record


def _outside(law: Any, params: float, tokens: float) -> tuple[list[str], Any]:
    """What of (params, tokens) lies beyond the law's fitted range (phrases), and the range (None: unknown)."""
    from lightning_scaling.laws.definitions import fitted_range

    found = fitted_range(law)
    return ([] if found is None else found.outside(params, tokens)), found


def _compute_group(s: Mapping[str, Any], seconds: float | None) -> dict[str, Any]:
    flops = _number(s.get("flops")) or None
    analytic = _number(s.get("flops_analytic"))
    per_second = _number(s.get("flops_per_sec"))
    mfu = _number(s.get("mfu"))
    uncounted = int(_number(s.get("uncounted_micro_batches")) or 0)
    numbers = {
        "model_flops": flops,
        "hardware_flops": _number(s.get("hardware_flops")) or None,
        "analytic_flops": analytic,
        "flops_per_second": per_second,
        "mfu": mfu,
        "optimizer_steps": s.get("optimizer_steps"),
        "measured_shapes": s.get("measured_shapes"),
        "uncounted_micro_batches": uncounted,
        "causal_attention": s.get("causal_attention"),
    }
    cautions = []
    if uncounted:
        cautions.append(
            f"the FLOPs of {uncounted} micro-batch(es) were not counted, so the totals are low "
            f'(raise {MONITOR}(flops={{"max_measured_shapes": ...}}))'
        )
    if flops is None:
        if analytic:
            return _group(
                "not measured",
                f"FLOPs not measured; the analytic count is {format_flops(analytic)} FLOPs",
                cautions=cautions,
                numbers=numbers,
            )
        return _group(
            "not measured",
            "FLOPs not measured (the FLOP counter could not run on this model)",
            cautions=cautions,
            numbers=numbers,
        )
    if mfu is None:
        return _group(
            "unknown",
            "MFU unknown: no dense peak FLOP/s is known for this device",
            [
                (
                    f"pass {MONITOR}(peak_flops=...), the dense peak FLOP/s of one device for the run's dtype "
                    "(e.g. 989e12 for an H100 SXM in bf16), to get MFU"
                )
            ],
            cautions,
            numbers=numbers,
        )
    if mfu >= GOOD_MFU:
        return _group(
            "good",
            f"MFU {format_percent(mfu)}: a well-used device (PaLM reached 46%)",
            cautions=cautions,
            numbers=numbers,
        )
    advice = []
    if seconds:
        faster = seconds * mfu / GOOD_MFU
        advice.append(
            f"at {format_percent(GOOD_MFU)} MFU the same {format_flops(flops)} FLOPs would take "
            f"{format_duration(faster)} instead of {format_duration(seconds)}"
        )
    advice.append("larger micro-batches, bf16 mixed precision, torch.compile and fused attention usually raise MFU")
    status = "low" if mfu < LOW_MFU else "fair"
    return _group(
        status,
        f"MFU {format_percent(mfu)}: {status}; the devices ran at {format_percent(mfu)} of their dense peak",
        advice,
        cautions,
        numbers=numbers,
    )


def _compute_optimal_band(law: Any, params: float, threshold: float) -> tuple[float, float] | None:
    """Tokens per parameter within which the run spends at most ``threshold`` extra compute under ``law``
    (de Vries 2023's overhead, from Hoffmann et al. 2022 eq. 2), or None."""
    ratios = np.logspace(-4, 6, 4001)
    overhead = np.asarray(law.compute_overhead(params, ratios * params), dtype=float)
    inside = ratios[overhead <= threshold]
    return (float(inside.min()), float(inside.max())) if inside.size else None


def _tokens_group(s: Mapping[str, Any], law: Any, thresholds: ReportThresholds, loss: float | None) -> dict[str, Any]:
    n, d = _number(s.get("params")), _number(s.get("tokens"))
    numbers: dict[str, Any] = {
        "training_tokens": d,
        "parameters": n,
        "tokens_per_parameter": None,
        "rule_tokens_per_parameter": thresholds.tokens_per_param,
        "compute_optimal_band": None,
        "compute_overhead": None,
        "training_flops_6nd": None,
        "predicted_loss": None,
        "final_training_loss": loss,
        "compute_optimal": None,
        "tokens_for_this_model": None,
        "law": _law_record(law),
        "non_embedding": s.get("non_embedding"),
        "token_rule": s.get("token_rule"),
        "supervised_tokens": s.get("supervised_tokens"),
    }
    if not n or not d:
        what = "parameters" if not n else "training tokens"
        return _group("unknown", f"no verdict: no {what} were counted", numbers=numbers)
    ratio, rule = d / n, thresholds.tokens_per_param
    overhead = float(law.compute_overhead(n, d))  # de Vries 2023, from Hoffmann et al. 2022 eq. 2
    flops = 6.0 * n * d  # C = 6·N·D (Kaplan et al. 2020, Table 1; Hoffmann et al. 2022, eq. 4's constraint)
    optimum = law.compute_optimal(flops)  # Hoffmann et al. 2022, eq. 4
    predicted = float(law.loss(n, d))
    band = _compute_optimal_band(law, n, thresholds.overhead_threshold)
    numbers.update(
        tokens_per_parameter=ratio,
        compute_overhead=overhead,
        training_flops_6nd=flops,
        predicted_loss=predicted,
        compute_optimal_band=None if band is None else list(band),
        tokens_for_this_model=rule * n,
        compute_optimal={
            "parameters": float(optimum.params),
            "tokens": float(optimum.tokens),
            "predicted_loss": float(optimum.loss),
        },
    )
    label = _law_label(law)
    outside, fitted = _outside(law, n, d)
    if ratio < rule and overhead > thresholds.overhead_threshold:
        status = "undertrained"
        verdict = f"undertrained: {ratio:.3g} tokens per parameter; about {rule:g} is compute-optimal"
        losses = "" if outside else f" (predicted loss {optimum.loss:.3g} against {predicted:.3g} nats/token)"
        law_advice = [
            (
                f"for the same {format_flops(flops)} FLOPs (6ND), {label}'s compute-optimal run is a "
                f"{format_count(optimum.params)}-parameter model on {format_count(optimum.tokens)} tokens{losses}"
            ),
            (
                f"keep this model and train {rule * n / d:.3g}x longer: {format_count(rule * n)} tokens "
                f"(~{rule:g} per parameter)"
            ),
        ]
    elif ratio > rule and (overhead > thresholds.overhead_threshold or ratio > thresholds.overtrained_factor * rule):
        status = "over-trained"
        verdict = (
            f"over-trained: {ratio:.3g} tokens per parameter, {ratio / rule:.3g}x the ~{rule:g} that is "
            "compute-optimal (a fine choice when inference dominates the model's cost)"
        )
        law_advice = []
        if callable(getattr(law, "optimal_for_loss", None)):
            cheapest = law.optimal_for_loss(predicted)  # Hoffmann et al. 2022, eq. 2 on the eq. 4 frontier
            law_advice.append(
                f"{label} reaches the same predicted loss ({predicted:.3g} nats/token) with a "
                f"{format_count(cheapest.params)}-parameter model on {format_count(cheapest.tokens)} tokens, "
                f"{format_percent(overhead / (1 + overhead))} less training compute"
            )
        law_advice += [
            (
                f"if the model will serve many tokens, pass {MONITOR}(inference_tokens=...) to compare with the "
                "inference-aware optimum (Sardana et al. 2023)"
            )
        ]
    else:
        status = "compute-optimal"
        verdict = (
            f"compute-optimal: {ratio:.3g} tokens per parameter, within "
            f"{format_percent(thresholds.overhead_threshold)} of the least compute for its loss"
        )
        bigger = law.compute_optimal(10 * flops)
        law_advice = [
            (
                f"to scale up, grow both: for 10x the compute {label}'s optimum is "
                f"{format_count(bigger.params)} parameters on {format_count(bigger.tokens)} tokens"
            )
        ]
    if not outside:
        cautions = [] if fitted is not None else [f"{label} records no fitted range: its numbers may be extrapolations"]
        return _group(status, verdict, law_advice, cautions, numbers=numbers)
    caution = (
        f"{format_count(n)} parameters on {format_count(d)} tokens lie far outside the runs {label} was "
        f"fitted on ({fitted.describe()}), so its numbers are extrapolations here, a flag and not advice: "
        + "; ".join(law_advice)
        + "."
    )
    return _group(status, verdict, [], [caution], flagged=True, numbers=numbers)


def _batch_group(s: Mapping[str, Any], thresholds: ReportThresholds) -> dict[str, Any]:
    gns, batch = _number(s.get("gns")), _number(s.get("batch_size"))
    gns_ok = gns is not None and gns > 0  # B_simple <= 0: no signal yet (|G|² estimate not positive)
    numbers = {
        "noise_scale_samples": gns if gns_ok else None,
        "noise_scale_stderr_samples": _number(s.get("gns_stderr")) if gns_ok else None,
        "noise_scale_tokens": _number(s.get("gns_tokens")) if gns_ok else None,
        "batch_samples": batch,
        "batch_tokens": _number(s.get("batch_tokens")),
        "batch_over_noise_scale": batch / gns if gns is not None and gns > 0 and batch else None,
        "measurements": s.get("measurements"),
        "skipped_nonfinite_steps": s.get("skipped_nonfinite"),
        "method": s.get("mode"),
        "whole_over_norm_layers": _number(s.get("whole_over_norm_layers")),
        "noise_scale_status": s.get("status"),
    }
    if gns is None or gns <= 0 or not batch:
        why = s.get("status") or "no estimate"
        return _group("not measured", f"B_simple not measured: {why}", numbers=numbers)
    ratio = batch / gns
    where = (
        f"{format_count(batch)} samples per step is {ratio:.3g}x the gradient noise scale B_simple ~ {gns:.3g} samples"
    )
    cautions = [
        (
            "B_simple approximates the critical batch size to within about an order of magnitude; with Adam "
            "the critical batch size tends to be larger, and it grows as the loss falls (McCandlish et al. 2018)"
        )
    ]
    source_cautions = []
    if s.get("mode") == "norm layers" and s.get("norm_layers_scale", 1.0) == 1.0:
        source_cautions.append(
            "this B_simple is the normalization layers' own, which reads about half the whole model's (0.4-0.6x "
            "on a small GPT, measured exactly); a run with accumulate_grad_batches=2 reports the factor to pass as "
            "norm_layers_scale"
        )
    cautions += source_cautions
    if ratio > thresholds.batch_high_ratio:
        target = thresholds.batch_high_ratio * gns
        return _group(
            "large",
            f"above the critical batch size: {where}",
            [
                (
                    f"E/E_min = 1 + B/B_noise ~ {1 + ratio:.3g}: this run spends about {(1 + ratio) / 2:.3g}x the "
                    f"examples a batch of B_simple would need for the same progress; a global batch near "
                    f"{_samples(target)} samples ({thresholds.batch_high_ratio:g}x B_simple) uses compute better, "
                    "if compute is the constraint"
                )
            ],
            cautions,
            numbers=numbers,
        )
    if ratio < thresholds.batch_low_ratio:
        return _group(
            "small",
            f"below the critical batch size: {where}",
            [
                (
                    f"S/S_min = 1 + B_noise/B ~ {1 + 1 / ratio:.3g}: a global batch near B_simple ({_samples(gns)} "
                    f"samples) needs about {(1 + 1 / ratio) / 2:.3g}x fewer optimizer steps for few extra examples, if "
                    "wall-clock time is the constraint"
                )
            ],
            cautions,
            numbers=numbers,
        )
    return _group(
        "efficient",
        f"near the critical batch size: {where} (efficient between "
        f"{thresholds.batch_low_ratio:g}x and {thresholds.batch_high_ratio:g}x)",
        [],
        source_cautions,
        numbers=numbers,
    )


def _data_group(s: Mapping[str, Any], law: Any, thresholds: ReportThresholds, params: float | None) -> dict[str, Any]:
    unique, epochs = _number(s.get("unique_tokens")), _number(s.get("epochs"))
    tokens, value = _number(s.get("tokens")), _number(s.get("repetition_value"))
    numbers = {
        "training_tokens": tokens,
        "unique_tokens": unique,
        "epochs": epochs,
        "effective_tokens": _number(s.get("effective_tokens")),
        "effective_tokens_per_parameter": _number(s.get("effective_tokens_per_param")),
        "repetition_value": value,
        "distinct_sample_fraction": _number(s.get("distinct_fraction")),
        "data_constrained_optimum": None,
        "law": _law_record(law),
    }
    if unique is None or epochs is None or not tokens:
        return _group(
            "unknown",
            "epochs unknown: the training data has no length and no distinct-sample sketch ran",
            [
                (
                    f"pass {MONITOR}(unique_tokens=...), the unique tokens in the training data, or "
                    f'{MONITOR}(repetition={{"sketch": True}})'
                )
            ],
            numbers=numbers,
        )
    of = f"{epochs:.3g} epochs of {format_count(unique)} unique tokens"
    if epochs <= 1:
        return _group("fresh", f"fresh data: {of}, no token repeated", numbers=numbers)
    worth = "" if value is None else f"; a repeated token is now worth {format_percent(value)} of a fresh one"
    if epochs <= thresholds.warn_epochs:
        return _group(
            "repeating",
            f"repeating, nearly as good as fresh data: {of}{worth} (Muennighoff et al. "
            f"2023: up to about {thresholds.warn_epochs:g} epochs)",
            numbers=numbers,
        )
    status = "diminishing" if epochs <= thresholds.stop_epochs else "worthless repeats"
    meaning = (
        "each further epoch is worth less than fresh data"
        if status == "diminishing"
        else "further repeats are worth little"
    )
    verdict = f"{'diminishing returns' if status == 'diminishing' else 'repeats worth little'}: {of}{worth}"
    advice = [f"{meaning}: add unique data"]
    cautions: list[str] = []
    flagged = False
    if params:
        flops = 6.0 * params * tokens  # C = 6·N·D (Kaplan et al. 2020, Table 1)
        best = law.compute_optimal(flops, unique)  # Muennighoff et al. 2023, eq. 7 on the iso-FLOP line
        numbers["data_constrained_optimum"] = {
            "parameters": float(best.params),
            "tokens": float(best.tokens),
            "epochs": float(best.epochs),
            "predicted_loss": float(best.loss),
        }
        line = (
            f"or, for the same {format_flops(flops)} FLOPs and unique data, {_law_label(law)}'s data-constrained "
            f"optimum is {format_count(best.params)} parameters for {float(best.epochs):.3g} epochs"
        )
        outside, fitted = _outside(law, params, tokens)
        if outside:
            flagged = True
            cautions.append(
                f"{format_count(params)} parameters on {format_count(tokens)} tokens lie far outside the "
                f"runs {_law_label(law)} was fitted on ({fitted.describe()}), so this is a flag, not "
                f"advice: {line}."
            )
        else:
            advice.append(line)
    return _group(status, verdict, advice, cautions, flagged=flagged, numbers=numbers)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):
        return _jsonable(value.item())
    return str(value)


# ------------------------------------------------------------------------------------------------- the text
_TITLES = {"compute": "compute", "tokens": "tokens", "batch_size": "batch size", "data": "data"}
_WIDTH = 112
_INDENT = 12


def format_run_report(report: Mapping[str, Any]) -> str:
    """The report as a person reads it: a headline, then per group the verdict, the numbers with their units,
    the advice and the cautions, then where the JSON and the picture are."""
    run = report.get("run", {})
    head = ["lightning-scaling report:"]
    if run.get("parameters"):
        head.append(f"{format_count(run['parameters'])} parameters")
    if run.get("training_tokens"):
        head.append(f"{'on ' if run.get('parameters') else ''}{format_count(run['training_tokens'])} tokens,")
    if run.get("optimizer_steps") is not None:
        head.append(f"{run['optimizer_steps']} optimizer steps")
    if run.get("training_seconds"):
        head.append(f"in {format_duration(run['training_seconds'])}")
    lines = [" ".join(head).rstrip(",")]
    for key in GROUPS:
        group = report.get(key)
        if not group:
            continue
        lines.append("")
        flag = " [flag: law extrapolated]" if group.get("flagged") else ""
        verdict = _wrap(group["verdict"] + flag)
        lines.append(f"{_TITLES[key]:<{_INDENT}}{verdict[0].lstrip()}")
        lines += verdict[1:]
        lines += _join_wrapped(_NUMBER_LINES[key](group))
        lines += [w for item in group.get("advice", []) for w in _wrap("advice: " + item)]
        lines += [w for item in group.get("cautions", []) for w in _wrap("caution: " + item)]
    files = report.get("files", {})
    lines.append("")
    if files.get("report"):
        lines.append(f"{'report':<{_INDENT}}{files['report']}")
    if files.get("picture"):
        lines.append(f"{'picture':<{_INDENT}}{files['picture']}")
    elif files.get("picture_note"):
        lines.append(f"{'picture':<{_INDENT}}{files['picture_note']}")
    return "\n".join(lines)


def _join_wrapped(items: list[str], separator: str = " | ") -> list[str]:
    """``items`` joined by ``separator`` into indented lines of at most the report's width, breaking between
    items (an item is never split unless it is longer than a line)."""
    lines: list[str] = []
    current = ""
    for item in items:
        candidate = item if not current else current + separator + item
        if current and _INDENT + len(candidate) > _WIDTH:
            lines.append(" " * _INDENT + current)
            candidate = item
        current = candidate
    if current:
        lines.append(" " * _INDENT + current)
    return lines


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(
        text, _WIDTH, initial_indent=" " * _INDENT, subsequent_indent=" " * (_INDENT + 2), break_on_hyphens=False
    )


def _compute_numbers(g: Mapping[str, Any]) -> list[str]:
    out = []
    if g.get("model_flops"):
        out.append(f"{format_flops(g['model_flops'])} FLOPs (model FLOPs, measured)")
    if g.get("hardware_flops") and g.get("model_flops") and g["hardware_flops"] != g["model_flops"]:
        out.append(f"{format_flops(g['hardware_flops'])} hardware FLOPs")
    if g.get("analytic_flops"):
        out.append(f"analytic count {format_flops(g['analytic_flops'])} FLOPs")
    if g.get("flops_per_second"):
        out.append(f"{format_flops(g['flops_per_second'])} FLOP/s")
    return out


def _tokens_numbers(g: Mapping[str, Any]) -> list[str]:
    out = []
    if g.get("training_tokens"):
        out.append(f"{format_count(g['training_tokens'])} tokens")
    if g.get("parameters"):
        kind = " (non-embedding)" if g.get("non_embedding") else ""
        out.append(f"{format_count(g['parameters'])} parameters{kind}")
    if g.get("compute_overhead") is not None:
        out.append(f"compute overhead {format_percent(g['compute_overhead'])}")
    if g.get("compute_optimal_band") and not g.get("flagged"):
        lo, hi = g["compute_optimal_band"]
        out.append(f"compute-optimal band {lo:.3g} to {hi:.3g} tokens per parameter")
    if g.get("final_training_loss") is not None:
        out.append(f"final training loss {g['final_training_loss']:.3g}")
    return out


def _batch_numbers(g: Mapping[str, Any]) -> list[str]:
    out = []
    if g.get("noise_scale_samples") is not None:
        text = f"B_simple {g['noise_scale_samples']:.3g} samples"
        if g.get("noise_scale_stderr_samples") is not None:
            text += f" (standard error {g['noise_scale_stderr_samples']:.2g})"
        if g.get("noise_scale_tokens") is not None:
            text += f", {format_count(g['noise_scale_tokens'])} tokens"
        out.append(text)
    if g.get("batch_samples"):
        text = f"batch {format_count(g['batch_samples'])} samples"
        if g.get("batch_tokens"):
            text += f", {format_count(g['batch_tokens'])} tokens per step"
        out.append(text)
    if g.get("measurements"):
        out.append(f"{g['measurements']} measurements")
    return out


def _data_numbers(g: Mapping[str, Any]) -> list[str]:
    out = []
    if g.get("effective_tokens") is not None and g.get("epochs") and g["epochs"] > 1:
        out.append(f"worth {format_count(g['effective_tokens'])} fresh tokens (D')")
    if g.get("distinct_sample_fraction") is not None:
        out.append(f"distinct samples {format_percent(g['distinct_sample_fraction'])} of those seen")
    return out


_NUMBER_LINES = {
    "compute": _compute_numbers,
    "tokens": _tokens_numbers,
    "batch_size": _batch_numbers,
    "data": _data_numbers,
}


def report_keys() -> dict[str, str]:
    """Every key of the report's JSON with its unit and meaning (the table in the README)."""
    return dict(REPORT_KEYS)


REPORT_KEYS: dict[str, str] = {
    "version": "format version of the report (1)",
    "run.parameters": "parameters counted (all unique parameters, or non-embedding when asked)",
    "run.training_tokens": "training tokens of the whole run (all ranks)",
    "run.optimizer_steps": "optimizer steps",
    "run.planned_optimizer_steps": "optimizer steps the run was planned for (null when unbounded)",
    "run.training_seconds": "wall-clock seconds from train start to train end, validation included",
    "run.final_training_loss": "mean training loss of the last logged step, as training_step returned it",
    "<group>.status": "short verdict code (see each group; any group may also be off: the part was left out, or "
    "error: its summary failed)",
    "<group>.verdict": "the one-line verdict",
    "<group>.flagged": "true when the run lies outside the law's fitted range: the verdict is a flag, not advice",
    "<group>.advice": "list of sentences: what to change, derived from the numbers",
    "<group>.cautions": "list of sentences: what limits the verdict",
    "compute.status": "good (MFU >= 40%), fair, low (MFU < 20%), unknown (no peak FLOP/s), not measured",
    "compute.model_flops": "training FLOPs of the model, measured (FLOPs; a multiply-add is 2)",
    "compute.hardware_flops": "FLOPs executed, activation recomputation included (FLOPs)",
    "compute.analytic_flops": "Chinchilla App. F count from the model's shape (FLOPs)",
    "compute.flops_per_second": "model FLOPs per second over the last window of steps (FLOP/s, all devices)",
    "compute.mfu": "model FLOPs utilisation: FLOP/s over the devices' dense peak (fraction, 0 to 1)",
    "compute.optimizer_steps": "optimizer steps counted",
    "compute.measured_shapes": "input shapes whose FLOPs were measured under the FLOP counter",
    "compute.uncounted_micro_batches": "micro-batches whose FLOPs were neither measured nor predicted",
    "compute.causal_attention": "how causal attention is counted: half (lower triangle) or full",
    "tokens.status": "undertrained, compute-optimal, over-trained, unknown",
    "tokens.training_tokens": "training tokens (tokens)",
    "tokens.parameters": "parameters (parameters)",
    "tokens.tokens_per_parameter": "training tokens per parameter",
    "tokens.rule_tokens_per_parameter": "the compute-optimal rule of thumb (tokens per parameter, ~20)",
    "tokens.compute_optimal_band": "[low, high] tokens per parameter within overhead_threshold extra compute",
    "tokens.compute_overhead": "extra compute over the compute-optimal run to the same loss (fraction; 0.2 = 20%)",
    "tokens.training_flops_6nd": "training FLOPs as the law counts them, 6·N·D (FLOPs)",
    "tokens.predicted_loss": "the law's loss for this N and D (nats per token, on the law's data)",
    "tokens.compute_optimal": "{parameters, tokens, predicted_loss}: the law's optimum for the same 6·N·D FLOPs",
    "tokens.tokens_for_this_model": "tokens at the rule of thumb for this model (tokens)",
    "tokens.law": "the law used: its constants, name and fitted_range {params, tokens, source}",
    "tokens.final_training_loss": "mean training loss of the last logged step, as training_step returned it",
    "tokens.non_embedding": "true when parameters are counted without the embeddings (Kaplan's convention)",
    "tokens.token_rule": "how training tokens were counted, in words",
    "tokens.supervised_tokens": "tokens whose label is not -100, when batches carry labels (tokens)",
    "batch_size.status": "efficient, large, small, not measured",
    "batch_size.noise_scale_samples": "gradient noise scale B_simple (samples)",
    "batch_size.noise_scale_stderr_samples": "its standard error (samples)",
    "batch_size.noise_scale_tokens": "B_simple in tokens (tokens)",
    "batch_size.batch_samples": "global batch in use (samples per optimizer step)",
    "batch_size.batch_tokens": "global batch in use (tokens per optimizer step)",
    "batch_size.batch_over_noise_scale": "batch in use / B_simple (ratio)",
    "batch_size.measurements": "optimizer steps measured",
    "batch_size.skipped_nonfinite_steps": "optimizer steps left out because their gradients were not finite",
    "batch_size.method": (
        "where the two batch sizes come from: hooks (accumulation and/or DDP), norm layers (their per-example "
        "gradients) or off"
    ),
    "batch_size.whole_over_norm_layers": (
        "the whole model's B_simple over the normalization layers' own, when both were measured (the factor "
        "for GradientNoiseScale(norm_layers_scale=...); ratio)"
    ),
    "batch_size.noise_scale_status": "why there is an estimate or not, in words",
    "data.status": "fresh, repeating, diminishing, worthless repeats, unknown",
    "data.unique_tokens": "unique tokens in the training data (tokens)",
    "data.epochs": "training tokens / unique tokens (epochs)",
    "data.effective_tokens": "D': the fresh tokens the run's tokens are worth (tokens, Muennighoff et al. 2023 eq. 5)",
    "data.repetition_value": "worth of the next repeated token against a fresh one (fraction)",
    "data.training_tokens": "training tokens (tokens)",
    "data.effective_tokens_per_parameter": "D' per parameter",
    "data.distinct_sample_fraction": "distinct samples / samples seen, when the sketch ran (fraction)",
    "data.law": "the data-constrained law used: its constants, name and fitted_range",
    "data.data_constrained_optimum": "{parameters, tokens, epochs, predicted_loss} for the same FLOPs and unique data",
    "files.report": "path of this JSON",
    "files.picture": "path of the PNG (null when not drawn; files.picture_note says why)",
    "files.picture_note": "why there is no picture (null when there is one)",
    "thresholds": "where the verdicts change: the parts' arguments of the same names",
    "history": "columns of the values at each logging step: "
    + ", ".join(f"{name} ({unit})" for name, unit in HISTORY_UNITS.items()),
}


# ---------------------------------------------------------------------------------------------- the picture
PLOT_EXTRA_HINT = "pip install 'lightning-scaling[plot]'"


def matplotlib_missing() -> str | None:
    """None when matplotlib can be imported, else the one line that says how to get the picture."""
    try:
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return f"not drawn: matplotlib is not installed ({PLOT_EXTRA_HINT})"
    return None


def draw_run_report(report: Mapping[str, Any], history: Mapping[str, Sequence[Any]] | None = None) -> Any:
    """The picture of the run as a ``matplotlib.figure.Figure`` on an Agg canvas (pyplot and the user's
    backend are left alone). Four panels against the optimizer step: tokens per parameter with the
    compute-optimal band and the projection to the end; training loss with the law's prediction for this N and D
    where the run lies inside the law's fitted range; B_simple against the batch in use; epochs and the worth of a
    repeated token. ``history`` defaults to ``report["history"]``. ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history = report.get("history") if history is None else history
    step = _column(history, "step")
    figure = Figure(figsize=(13, 8.5), dpi=100)
    FigureCanvasAgg(figure)
    # fixed margins: a layout engine would lay the figure out in an extra pass (about half the drawing time)
    axes = figure.subplots(
        2,
        2,
        sharex=True,
        gridspec_kw={"left": 0.06, "right": 0.94, "bottom": 0.065, "top": 0.925, "wspace": 0.2, "hspace": 0.14},
    )
    _panel_tokens(axes[0, 0], report, history, step)
    _panel_loss(axes[0, 1], report, history, step)
    _panel_batch(axes[1, 0], report, history, step)
    _panel_data(axes[1, 1], report, history, step)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    run = report.get("run", {})
    title = "lightning-scaling run report"
    facts = []
    if run.get("parameters"):
        facts.append(f"{format_count(run['parameters'])} parameters")
    if run.get("training_tokens"):
        facts.append(f"{format_count(run['training_tokens'])} tokens")
    if run.get("optimizer_steps") is not None:
        facts.append(f"{run['optimizer_steps']} optimizer steps")
    figure.suptitle(title + (": " + ", ".join(facts) if facts else ""), fontsize=13, fontweight="bold")
    return figure


def save_picture(figure: Any, path: str) -> np.ndarray:
    """Write ``figure`` as a PNG at ``path``; returns the pixels drawn, an RGB array of shape (height, width, 3),
    uint8 (for a logger's ``add_image``; the figure is drawn once for both)."""
    figure.savefig(path, format="png", dpi=figure.dpi)
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def _plain_log_axis(ax: Any) -> None:
    """A log y axis labelled 0.1, 1, 10, 2k, 1M rather than 10^-1 or 2 x 10^3."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: format_count(value)))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _status_title(ax: Any, title: str, group: Mapping[str, Any] | None) -> None:
    status = (group or {}).get("status")
    flagged = " (flag: law extrapolated)" if (group or {}).get("flagged") else ""
    ax.set_title(f"{title}: {status}{flagged}" if status else title, fontsize=11, loc="left")


def _note(ax: Any, text: str) -> None:
    ax.text(
        0.5,
        0.5,
        "\n".join(textwrap.wrap(text, 60)),
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=9,
        color="0.35",
    )


def _plot_finite(ax: Any, x: np.ndarray, y: np.ndarray, *args: Any, **kwargs: Any) -> bool:
    keep = np.isfinite(x) & np.isfinite(y) if y.size == x.size else np.zeros(0, bool)
    if not keep.any():
        return False
    ax.plot(x[keep], y[keep], *args, **kwargs)
    return True


def _panel_tokens(ax: Any, report: Mapping[str, Any], history: Any, step: np.ndarray) -> None:
    group = report.get("tokens") or {}
    _status_title(ax, "Tokens per parameter", group)
    ax.set_ylabel("training tokens per parameter")
    ratio = _column(history, "tokens_per_parameter")
    projected = _column(history, "projected_tokens_per_parameter")
    if not _plot_finite(ax, step, ratio, color="C0", lw=2, label="so far"):
        _note(ax, "no tokens per parameter were logged (the token budget is off, or no logging step was reached)")
        return
    _plot_finite(
        ax, step, projected, color="C1", lw=1.2, ls=":", marker=".", ms=4, label="end of run, as projected at each step"
    )
    planned = report.get("run", {}).get("planned_optimizer_steps")
    last = int(np.flatnonzero(np.isfinite(ratio))[-1])
    end = _last(projected)
    if planned and end is not None and planned > step[last]:
        ax.plot([step[last], planned], [ratio[last], end], color="C0", ls="--", lw=1.5, label="projection to the end")
    band = group.get("compute_optimal_band")
    rule = group.get("rule_tokens_per_parameter")
    law = (group.get("law") or {}).get("name") or "the law"
    if band:
        within = format_percent((report.get("thresholds") or {}).get("overhead_threshold", 0.1))
        ax.axhspan(
            band[0],
            band[1],
            color="C2",
            alpha=0.15,
            label=f"compute-optimal band: <= {within} extra compute ({law} law"
            + (", extrapolated)" if group.get("flagged") else ")"),
        )
    if rule:
        ax.axhline(rule, color="C2", ls="--", lw=1, label=f"~{rule:g} tokens per parameter (Hoffmann et al. 2022)")
    _plain_log_axis(ax)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="best")


def _panel_loss(ax: Any, report: Mapping[str, Any], history: Any, step: np.ndarray) -> None:
    group = report.get("tokens") or {}
    ax.set_title("Training loss", fontsize=11, loc="left")
    ax.set_ylabel("training loss (as training_step returns it)")
    loss = _column(history, "training_loss")
    if not _plot_finite(ax, step, loss, color="C0", lw=1.5, label="training loss"):
        _note(ax, "no training loss was recorded")
        return
    tokens = _column(history, "training_tokens")
    params = group.get("parameters")
    law_record = group.get("law")
    if group.get("flagged") or not params or not law_record:
        why = "outside the law's fitted range" if group.get("flagged") else "no law or parameter count"
        ax.text(
            0.98,
            0.95,
            f"no law prediction: this run lies {why}" if group.get("flagged") else f"no law prediction ({why})",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            color="0.35",
        )
    else:
        from lightning_scaling.laws.definitions import law_from_dict

        law: Any = law_from_dict(law_record)
        keep = np.isfinite(tokens) & (tokens > 0)
        if keep.any() and callable(getattr(law, "loss", None)):
            predicted = np.asarray(law.loss(params, tokens[keep]), dtype=float)
            ax.plot(
                step[keep],
                predicted,
                color="C3",
                ls="--",
                lw=1.5,
                label=f"{law_record.get('name') or 'law'} law L(N, D) for this N and the tokens so far (nats/token)",
            )
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8, loc="best")


def _panel_batch(ax: Any, report: Mapping[str, Any], history: Any, step: np.ndarray) -> None:
    group = report.get("batch_size") or {}
    _status_title(ax, "Batch size against the gradient noise scale", group)
    ax.set_ylabel("samples per optimizer step")
    noise = _column(history, "noise_scale_samples")
    batch = _column(history, "batch_samples")
    drawn = _plot_finite(ax, step, batch, color="C0", lw=2, label="batch in use")
    keep = np.isfinite(step) & np.isfinite(noise) & (noise > 0) if noise.size == step.size else np.zeros(0, bool)
    if keep.any():
        ax.plot(step[keep], noise[keep], color="C3", lw=1.5, label="B_simple (gradient noise scale)")
        limits = report.get("thresholds") or {}
        low, high = limits.get("batch_low_ratio", 0.25), limits.get("batch_high_ratio", 4.0)
        ax.fill_between(
            step[keep],
            low * noise[keep],
            high * noise[keep],
            color="C3",
            alpha=0.12,
            label=f"{low:g}x to {high:g}x B_simple",
        )
    elif drawn:
        ax.text(
            0.98,
            0.05,
            f"B_simple not measured: {group.get('noise_scale_status') or 'no estimate'}",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
            color="0.35",
            wrap=True,
        )
    if not drawn and not keep.any():
        _note(ax, f"not measured: {group.get('noise_scale_status') or group.get('verdict') or 'no estimate'}")
        return
    _plain_log_axis(ax)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="best")


def _panel_data(ax: Any, report: Mapping[str, Any], history: Any, step: np.ndarray) -> None:
    group = report.get("data") or {}
    _status_title(ax, "Epochs and the worth of repeated data", group)
    ax.set_ylabel("epochs over the unique data")
    epochs = _column(history, "epochs")
    if not _plot_finite(ax, step, epochs, color="C0", lw=2, label="epochs"):
        _note(ax, group.get("verdict") or "epochs unknown")
        return
    _plot_finite(
        ax,
        step,
        _column(history, "projected_epochs"),
        color="C1",
        ls=":",
        marker=".",
        ms=4,
        label="end of run, as projected",
    )
    warn = (report.get("thresholds") or {}).get("warn_epochs")
    top = float(np.nanmax(np.concatenate([epochs, _column(history, "projected_epochs")])))
    if warn and top >= warn / 2:
        ax.axhline(warn, color="C3", ls="--", lw=1, label=f"{warn:g} epochs: diminishing returns (Muennighoff 2023)")
        top = max(top, warn)
    ax.set_ylim(0, 1.45 * top)  # the top quarter holds the legend
    ax.grid(True, alpha=0.25)
    value_ax = ax.twinx()
    value = _column(history, "repetition_value")
    _plot_finite(value_ax, step, value, color="C2", lw=1.5, ls="--", label="worth of a repeated token (right)")
    value_ax.set_ylim(0, 1.6)  # 1 (a fresh token's worth) sits clear of the epochs' top and of the legend
    value_ax.set_yticks(np.linspace(0, 1, 6))
    value_ax.set_ylabel("worth of a repeated token against a fresh one")
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = value_ax.get_legend_handles_labels()
    value_ax.legend(handles + more, labels + more_labels, fontsize=8, loc="upper left", ncols=2)
