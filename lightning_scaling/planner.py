"""Plan a training run: model size, tokens, FLOPs, predicted loss and what it costs on real hardware.

``plan(...)`` is the engine behind ``lightning-scaling plan``: pure Python and numpy (no torch, no Lightning),
returning one JSON-able dict. Every rejection is a ``ValueError`` naming the argument.

Fields of the returned dict (always present unless marked "or None"):

- ``mode``: which inputs fixed the run: "flops", "params", "tokens", "params+tokens", "flops+params",
  "flops+tokens", "target_loss" (a model shape counts as "params").
- ``law``: the law used (its ``to_dict()``), with ``source``: "preset" or the law file's path.
- ``params`` (parameters), ``tokens`` (training tokens), ``flops`` (training FLOPs), ``tokens_per_param``,
  ``loss`` (predicted, nats/token), ``flops_per_token`` (training FLOPs per token: 6·params, or the analytic
  count of a model shape), ``flops_convention`` ("6N" or the analytic convention's name).
- ``compute_overhead``: extra compute against the compute-optimal run reaching the same ``loss``
  (0 = optimal, 0.25 = 25% more; de Vries 2023); ``same_loss_optimum``: that run (params, tokens, flops,
  tokens_per_param, loss); ``compute_optimum``: the loss-minimising run for the same ``flops``.
- ``model`` (or None): the shape given, with ``params``, ``non_embedding_params``, ``flops_per_token``.
- ``data`` (or None, needs ``unique_tokens``): ``unique_tokens``, ``epochs``, ``effective_tokens``,
  ``effective_params``, ``loss`` (predicted with repetition), ``repetition_value`` (worth of the last repeated
  token against a fresh one), ``optimum`` (the data-constrained optimum for the same flops: params, tokens,
  tokens_per_param, epochs, loss).
- ``inference`` (or None, needs ``inference_tokens``): ``inference_tokens``, ``planned`` and ``optimum`` (each
  params, tokens, tokens_per_param, training_flops, inference_flops, total_flops), ``saved_flops``,
  ``saved_fraction``. Both sides count 6·N·D for training and 2·N per inference token (Sardana 2023).
- ``hardware`` (or None, needs ``gpu`` or ``peak_flops``): ``gpu``, ``dtype``, ``peak_flops_per_gpu``,
  ``num_gpus``, ``mfu``, ``achieved_flops_per_second``, ``wall_clock_hours``, ``gpu_hours``.
- ``batch`` (or None, needs ``batch_size`` and ``seq_len``): ``batch_size`` (sequences), ``seq_len``,
  ``tokens_per_step``, ``steps``, ``seconds_per_step`` (or None without hardware).
- ``warnings``: sentences for a person (a list, empty when all is well): the run or an optimum lies more than
  ``EXTRAPOLATION_MARGIN`` times outside the runs the law was fitted on (``laws.fitted_range``; a law file
  written by ``lightning-scaling fit --out`` records its own), repeated data past the point where the law
  is saturated (``REPETITION_VALUE_FLOOR``), or a deprecated preset name. From Python they are also issued as
  ``laws.ExtrapolationWarning`` (``FutureWarning`` for the preset name).

What the planner refuses (``ValueError`` naming the inputs): any advice (the law's optimum for the inputs, the
same-loss, data-constrained and inference-aware optima) of fewer than ``MIN_PARAMS`` parameters or fewer than
``MIN_TOKENS_PER_PARAM`` training tokens per parameter, a run of under one parameter or one token, and any
number that would be inf or NaN.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

from lightning_scaling.argument_checks import boolean, fraction, one_of, positive_float, positive_int
from lightning_scaling.laws import definitions as _laws

_SHAPE = ("n_layer", "d_model", "n_head", "vocab_size")
FLOPS_CONVENTIONS = ("chinchilla", "kaplan", "palm")
DTYPES = ("bf16", "fp16", "tf32", "fp32", "fp8")

# What is never advice, whatever the law's formula gives. A model has at least one parameter. A compute-optimal
# run trains each parameter on at least one token: the optima of the presets from 1e18 to 1e26 FLOPs lie
# between 16 and 153 tokens per parameter (Hoffmann et al. 2022, Table 3: about 20), so an "optimum" under one
# token per parameter is the formula far outside its data, not a run to train.
MIN_PARAMS = 1.0
MIN_TOKENS_PER_PARAM = 1.0
# Past the epochs at which a repeated token is worth under 1% of a fresh one (about 72 epochs: 1 + R*_D·ln 100,
# Muennighoff et al. 2023, eq. 5) the repeated-data law is saturated: D' sits at 99% of its ceiling, its
# optimum is flat and ill-determined, and the planner says so.
REPETITION_VALUE_FLOOR = 0.01
EXTRAPOLATION_MARGIN = _laws.EXTRAPOLATION_MARGIN


def _count(name: str, value: Any) -> float:
    """A count of FLOPs, parameters or tokens: finite and at least 1 (less is no model and no run)."""
    out = positive_float(name, value)
    if out < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
    return out


class _Notes:
    """The plan's warnings: sentences for the result, each with the Python warning category it is issued as."""

    def __init__(self) -> None:
        self.items: list[tuple[type[Warning], str]] = []

    def add(self, message: str, category: type[Warning] = _laws.ExtrapolationWarning) -> None:
        self.items.append((category, message))

    @property
    def messages(self) -> list[str]:
        return [message for _, message in self.items]


def _many(count: float, unit: str) -> str:
    """ "0.155 parameters", "1 parameter", "just under 1 parameter" (never a rounded 1 that hides a refusal)."""
    text = f"{count:.3g}"
    if text == "1" and count < 1:
        return f"just under 1 {unit}"
    return f"{text} {unit}" if text == "1" else f"{text} {unit}s"


def _trainable(what: str, n: float, d: float, blame: str, hint: str = "") -> None:
    """Refuse advice of under MIN_PARAMS parameters or MIN_TOKENS_PER_PARAM tokens per parameter."""
    if n >= MIN_PARAMS and d >= MIN_TOKENS_PER_PARAM * n:
        return
    raise ValueError(
        f"{blame}: {what} would be {_many(n, 'parameter')} on {_many(d, 'token')} ({d / n:.3g} per "
        f"parameter), and a plan needs at least {MIN_PARAMS:g} parameter and {MIN_TOKENS_PER_PARAM:g} "
        f"training token per parameter{hint}"
    )


def _solve(fn: Callable[[], Any], blame: str, what: str) -> Any:
    """A law's optimum; its out-of-range ValueError re-worded to blame the inputs as the user gave them."""
    try:
        return fn()
    except ValueError:
        raise ValueError(f"{blame}: {what} leaves the floating-point range") from None


def _arg_namer(cli_names: bool) -> Callable[[str], str]:
    """How messages name an argument: ``unique_tokens`` (Python) or ``--unique-tokens`` (command line)."""
    return (lambda name: "--" + name.replace("_", "-")) if cli_names else (lambda name: name)


def _resolve_law(law: Any, law_file: Any, arg: Callable[[str], str], notes: _Notes) -> tuple[Any, Any, str, Any]:
    """(Chinchilla law, data-constrained law, source, fitted range or None) from a preset name or a law file."""
    if law is not None and law_file is not None:
        raise ValueError(
            f"{arg('law')} and {arg('law_file')} are mutually exclusive: give a preset name or a file, not both"
        )
    if law_file is None:
        if law is None:
            chinchilla = _laws.DEFAULT_LAW
        else:
            if not isinstance(law, str):
                raise ValueError(
                    f"{arg('law')} must be a preset name, one of {', '.join(map(repr, _laws.LAWS))}, got {law!r}"
                )
            key = law.strip().lower()
            if key in _laws.DEPRECATED_LAW_NAMES:
                notes.add(_laws.deprecated_law_name_message(key, arg("law")), FutureWarning)
                key = _laws.DEPRECATED_LAW_NAMES[key]
            chinchilla = _laws.LAWS[one_of(arg("law"), key, tuple(_laws.LAWS))]
        return (
            chinchilla,
            _laws.DataConstrainedLaw.from_chinchilla(chinchilla),
            "preset",
            _laws.fitted_range(chinchilla),
        )
    if not isinstance(law_file, (str, os.PathLike)):
        raise ValueError(f"{arg('law_file')} must be the path of a law file, got {law_file!r}")
    try:
        loaded = _laws.load_law(law_file)
        recorded = _laws.load_fitted_range(law_file)
    except ValueError as err:
        raise ValueError(f"{arg('law_file')}: {err}") from None
    fitted = recorded or _laws.fitted_range(loaded)
    if isinstance(loaded, _laws.DataConstrainedLaw):
        return loaded.base_law, loaded, str(law_file), fitted
    if isinstance(loaded, _laws.ChinchillaLaw):
        return loaded, _laws.DataConstrainedLaw.from_chinchilla(loaded), str(law_file), fitted
    raise ValueError(
        f"{arg('law_file')} {str(law_file)!r} holds a {type(loaded).__name__}; plan needs a Chinchilla-form law"
    )


def _run(n: float, d: float, loss: float, flops: float | None = None) -> dict[str, float]:
    return {
        "params": n,
        "tokens": d,
        "flops": 6.0 * n * d if flops is None else flops,  # Kaplan 2020 Table 1 / Hoffmann 2022: C ≈ 6ND
        "tokens_per_param": d / n,
        "loss": loss,
    }


def _model(
    shape: dict[str, Any],
    seq_len: int | None,
    d_ff: int | None,
    gated_mlp: bool,
    tied_embeddings: bool,
    non_embedding: bool,
    flops_convention: str | None,
    arg: Callable[[str], str],
    n_kv_head: int | None = None,
    head_dim: int | None = None,
) -> dict[str, Any]:
    missing = [arg(k) for k in (*_SHAPE, "seq_len") if (seq_len if k == "seq_len" else shape[k]) is None]
    if missing or seq_len is None:
        needed = ", ".join(arg(k) for k in (*_SHAPE, "seq_len"))
        raise ValueError(f"{', '.join(missing)} missing: a model shape needs all of {needed}")
    if head_dim is None and shape["d_model"] % shape["n_head"]:
        raise ValueError(
            f"{arg('d_model')} must be divisible by {arg('n_head')}, got {shape['d_model']} and {shape['n_head']}"
        )
    from lightning_scaling.flops.formulas import transformer_flops, transformer_params  # lazy: only shape mode needs it

    convention = one_of(arg("flops_convention"), flops_convention or "chinchilla", FLOPS_CONVENTIONS)
    if n_kv_head is not None and shape["n_head"] % n_kv_head:
        raise ValueError(
            f"{arg('n_head')} must be a multiple of {arg('n_kv_head')}, got {shape['n_head']} and {n_kv_head}"
        )
    counts = transformer_params(
        shape["n_layer"],
        shape["d_model"],
        shape["vocab_size"],
        d_ff=d_ff,
        gated_mlp=gated_mlp,
        tied_embeddings=tied_embeddings,
        n_head=shape["n_head"],
        n_kv_head=n_kv_head,
        head_dim=head_dim,
    )
    per_seq = transformer_flops(
        shape["n_layer"],
        shape["d_model"],
        shape["n_head"],
        seq_len,
        shape["vocab_size"],
        d_ff=d_ff,
        gated_mlp=gated_mlp,
        convention=convention,
        n_kv_head=n_kv_head,
        head_dim=head_dim,
    )
    return {
        **shape,
        "seq_len": seq_len,
        "d_ff": d_ff if d_ff is not None else 4 * shape["d_model"],
        "gated_mlp": gated_mlp,
        "n_kv_head": n_kv_head if n_kv_head is not None else shape["n_head"],
        "head_dim": head_dim if head_dim is not None else shape["d_model"] // shape["n_head"],
        "tied_embeddings": tied_embeddings,
        "params": float(counts.non_embedding if non_embedding else counts.total),
        "params_counted": "non_embedding" if non_embedding else "total",
        "total_params": float(counts.total),
        "non_embedding_params": float(counts.non_embedding),
        "flops_per_token": float(per_seq.per_token),
        "flops_convention": convention,
    }


def _hardware(
    flops: float,
    gpu: str | None,
    num_gpus: int | None,
    mfu: float | None,
    peak_flops: float | None,
    dtype: str | None,
    arg: Callable[[str], str],
) -> dict[str, Any] | None:
    if gpu is not None:
        if peak_flops is not None:
            raise ValueError(
                f"{arg('gpu')} and {arg('peak_flops')} are mutually exclusive: {arg('peak_flops')} replaces the "
                "table figure"
            )
        from lightning_scaling.flops.hardware import dense_peak_flops

        peak = dense_peak_flops(
            gpu, one_of(arg("dtype"), dtype or "bf16", DTYPES), gpu_argument=arg("gpu"), dtype_argument=arg("dtype")
        )
    elif peak_flops is not None:
        if dtype is not None:
            raise ValueError(
                f"{arg('dtype')} needs {arg('gpu')}: it picks the table figure that {arg('peak_flops')} replaces"
            )
        peak = peak_flops
    else:
        for name, value in (("mfu", mfu), ("num_gpus", num_gpus), ("dtype", dtype)):
            if value is not None:
                raise ValueError(f"{arg(name)} needs {arg('gpu')} or {arg('peak_flops')}: there is nothing to run on")
        return None
    num_gpus = 1 if num_gpus is None else num_gpus
    mfu = 0.4 if mfu is None else mfu
    achieved = peak * num_gpus * mfu  # MFU = achieved model FLOP/s / peak (PaLM, Chowdhery 2022, App. B)
    hours = flops / achieved / 3600.0 if achieved > 0 else math.inf
    if not math.isfinite(hours) or not math.isfinite(achieved):
        raise ValueError(
            f"{arg('peak_flops')}, {arg('num_gpus')} and {arg('mfu')} are out of range: the wall-clock overflows"
        )
    return {
        "gpu": gpu,
        "dtype": (dtype or "bf16") if gpu is not None else None,
        "peak_flops_per_gpu": peak,
        "num_gpus": num_gpus,
        "mfu": mfu,
        "achieved_flops_per_second": achieved,
        "wall_clock_hours": hours,
        "gpu_hours": hours * num_gpus,
    }


def _data(
    data_law: Any, n: float, d: float, flops: float, unique: float, arg: Callable[[str], str], notes: _Notes
) -> dict[str, Any]:
    blame = f"{arg('unique_tokens')} {unique:g} with {flops:.3g} training FLOPs"
    optimum = _solve(lambda: data_law.compute_optimal(flops, unique), blame, "the repeated-data optimum")
    _trainable("the repeated-data optimum (Muennighoff et al. 2023)", optimum.params, optimum.tokens, blame)
    saturated = data_law.epochs_at_value(REPETITION_VALUE_FLOOR)
    beyond = [
        f"{label} ({epochs:.3g} epochs)"
        for label, epochs in (("the planned run", d / unique), ("the repeated-data optimum", optimum.epochs))
        if epochs > saturated
    ]
    if beyond:
        notes.add(
            f"{' and '.join(beyond)} over {arg('unique_tokens')} {unique:g} lie past {saturated:.0f} epochs, "
            f"where a repeated token is worth under {REPETITION_VALUE_FLOOR:.0%} of a fresh one (Muennighoff et "
            f"al. 2023, eq. 5): the law is saturated there and its optimum ill-determined; more unique data, "
            f"not more compute, is what lowers the loss"
        )
    return {
        "unique_tokens": unique,
        "epochs": d / unique,
        "effective_tokens": data_law.effective_tokens(d, unique),
        "effective_params": data_law.effective_params(n, unique),
        "loss": data_law.loss(n, d, unique),
        "repetition_value": data_law.repetition_value(d, unique),
        "optimum": {**_run(optimum.params, optimum.tokens, optimum.loss, flops), "epochs": optimum.epochs},
    }


def _inference(
    law: Any, n: float, d: float, loss: float, inference_tokens: float, arg: Callable[[str], str]
) -> dict[str, Any]:
    if not loss > law.E:
        raise ValueError(f"{arg('inference_tokens')}: the run is so large that its predicted loss equals the law's E")
    blame = f"{arg('inference_tokens')} {inference_tokens:g}"
    alt = _solve(lambda: _laws.inference_optimal(law, loss, inference_tokens), blame, "the inference-aware optimum")
    _trainable("the inference-aware optimum (Sardana et al. 2023)", alt.params, alt.tokens, blame)

    def side(pn: float, pd: float) -> dict[str, float]:
        # Sardana et al. 2023, §3: total = 6·N·D_train + 2·N·D_inference
        train, infer = 6.0 * pn * pd, 2.0 * pn * inference_tokens
        return {
            "params": pn,
            "tokens": pd,
            "tokens_per_param": pd / pn,
            "training_flops": train,
            "inference_flops": infer,
            "total_flops": train + infer,
        }

    planned, optimum = side(n, d), side(alt.params, alt.tokens)
    saved = max(planned["total_flops"] - optimum["total_flops"], 0.0)
    return {
        "inference_tokens": inference_tokens,
        "planned": planned,
        "optimum": optimum,
        "saved_flops": saved,
        "saved_fraction": saved / planned["total_flops"],
    }


def _extrapolation(law_label: str, fitted: Any, runs: list[tuple[str, float, float]]) -> str | None:
    """A warning when any of ``runs`` (label, params, tokens) lies EXTRAPOLATION_MARGIN times past ``fitted``."""
    if fitted is None:
        return None
    found = [f"{label}: {'; '.join(where)}" for label, n, d in runs if (where := fitted.outside(n, d))]
    if not found:
        return None
    source = f" ({fitted.source})" if fitted.source else ""
    return (
        f"{'; '.join(found)}. The law {law_label} was fitted on {fitted.describe()}{source}, so these numbers "
        f"are extrapolations more than {EXTRAPOLATION_MARGIN:g}x beyond its runs"
    )


# the inputs behind each section of the result, blamed when a number in it overflows
_SECTION_INPUTS = {
    "inference": ("inference_tokens",),
    "data": ("unique_tokens",),
    "hardware": ("peak_flops", "num_gpus", "mfu"),
    "batch": ("batch_size", "seq_len"),
}


def _check_finite(value: Any, arg: Callable[[str], str], path: str = "") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, arg, f"{path}.{key}" if path else key)
    elif isinstance(value, float) and not math.isfinite(value):
        names = _SECTION_INPUTS.get(path.split(".")[0], ("flops", "params", "tokens"))
        inputs = ", ".join(arg(k) for k in names[:-1]) + (" or " if len(names) > 1 else "") + arg(names[-1])
        raise ValueError(
            f"{inputs} out of range: the plan's {path.replace('.', ' ')} overflows the floating-point range"
        )


def plan(
    *,
    flops: float | None = None,
    params: float | None = None,
    tokens: float | None = None,
    target_loss: float | None = None,
    n_layer: int | None = None,
    d_model: int | None = None,
    n_head: int | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    d_ff: int | None = None,
    gated_mlp: bool = False,
    n_kv_head: int | None = None,
    head_dim: int | None = None,
    tied_embeddings: bool = True,
    non_embedding: bool = False,
    flops_convention: str | None = None,
    unique_tokens: float | None = None,
    inference_tokens: float | None = None,
    law: str | None = None,
    law_file: str | None = None,
    gpu: str | None = None,
    num_gpus: int | None = None,
    mfu: float | None = None,
    peak_flops: float | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    cli_names: bool = False,
) -> dict[str, Any]:
    """Plan one training run; returns the JSON-able dict described in this module's docstring.

    Fix the run with ``flops`` (training FLOPs), ``params`` (parameters), ``tokens`` (training tokens), any two
    of them, a ``target_loss`` (nats/token) alone, or a model shape (``n_layer``, ``d_model``, ``n_head``,
    ``vocab_size``, ``seq_len``; optional ``d_ff``, ``gated_mlp``, ``n_kv_head`` (grouped-query attention),
    ``head_dim``) in place of ``params``, whose FLOPs per token
    are then counted analytically (``flops_convention``: chinchilla, kaplan or palm) instead of 6·params.
    What is missing is taken at the law's optimum. ``law`` ("hoffmann", "besiroglu" (default), "muennighoff";
    the old name "epoch" still works, with a warning) or ``law_file`` (JSON of a law's ``to_dict()``) picks the
    law. Optional sections: ``unique_tokens``
    (repeated data, Muennighoff 2023), ``inference_tokens`` (Sardana 2023), ``gpu``/``peak_flops`` with
    ``num_gpus``, ``mfu`` (default 0.4), ``dtype`` (default bf16) for wall-clock, ``batch_size`` (sequences,
    with ``seq_len``) for steps. Messages name arguments as Python names, or as ``--flags`` when ``cli_names``.
    The result's ``warnings`` are also issued as Python warnings, except with ``cli_names`` (the command prints them).
    """
    cli_names = boolean("cli_names", cli_names)
    arg = _arg_namer(cli_names)
    notes = _Notes()

    def optional(check: Callable[[str, Any], Any], name: str, value: Any) -> Any:
        return None if value is None else check(arg(name), value)

    flops = optional(_count, "flops", flops)
    params = optional(_count, "params", params)
    tokens = optional(_count, "tokens", tokens)
    target_loss = optional(positive_float, "target_loss", target_loss)
    shape = {
        k: optional(positive_int, k, v) for k, v in zip(_SHAPE, (n_layer, d_model, n_head, vocab_size), strict=True)
    }
    seq_len = optional(positive_int, "seq_len", seq_len)
    d_ff = optional(positive_int, "d_ff", d_ff)
    n_kv_head = optional(positive_int, "n_kv_head", n_kv_head)
    head_dim = optional(positive_int, "head_dim", head_dim)
    unique_tokens = optional(_count, "unique_tokens", unique_tokens)
    inference_tokens = optional(_count, "inference_tokens", inference_tokens)
    num_gpus = optional(positive_int, "num_gpus", num_gpus)
    mfu = optional(fraction, "mfu", mfu)
    peak_flops = optional(positive_float, "peak_flops", peak_flops)
    batch_size = optional(positive_int, "batch_size", batch_size)
    gated_mlp = boolean(arg("gated_mlp"), gated_mlp)
    tied_embeddings = boolean(arg("tied_embeddings"), tied_embeddings)
    non_embedding = boolean(arg("non_embedding"), non_embedding)
    for name, value in (("flops_convention", flops_convention), ("gpu", gpu), ("dtype", dtype)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{arg(name)} must be a name (a string), got {value!r}")

    chinchilla, data_law, source, fitted = _resolve_law(law, law_file, arg, notes)
    law_label = chinchilla.name or ("from " + arg("law_file") if law_file is not None else "given")

    # --- the model: a shape, or a parameter count ----------------------------------------------------------
    model = None
    if any(v is not None for v in shape.values()):
        if params is not None:
            raise ValueError(
                f"{arg('params')} and a model shape ({', '.join(map(arg, _SHAPE))}) are mutually exclusive"
            )
        model = _model(
            shape, seq_len, d_ff, gated_mlp, tied_embeddings, non_embedding, flops_convention, arg, n_kv_head, head_dim
        )
        params = model["params"]
    else:
        extras = {
            "d_ff": d_ff is not None,
            "gated_mlp": gated_mlp,
            "n_kv_head": n_kv_head is not None,
            "head_dim": head_dim is not None,
            "tied_embeddings": not tied_embeddings,
            "non_embedding": non_embedding,
            "flops_convention": flops_convention is not None,
        }
        for name, is_set in extras.items():
            if is_set:
                raise ValueError(f"{arg(name)} needs a model shape ({', '.join(map(arg, (*_SHAPE, 'seq_len')))})")
        if seq_len is not None and batch_size is None:
            raise ValueError(f"{arg('seq_len')} needs {arg('batch_size')} or a model shape: alone it changes nothing")
    fpt = model["flops_per_token"] if model else None  # analytic FLOPs per token, or 6N below

    # --- the run: (params, tokens, flops) --------------------------------------------------------------------
    given = [k for k, v in (("flops", flops), ("params", params), ("tokens", tokens)) if v is not None]
    values = {"flops": flops, "params": params, "tokens": tokens, "target_loss": target_loss}

    def said(name: str) -> str:
        if name == "params" and model is not None:
            given_dims = {k: model[k] for k in (*_SHAPE, "seq_len", "d_ff")}
            given_dims.update({k: v for k, v in (("n_kv_head", n_kv_head), ("head_dim", head_dim)) if v is not None})
            switches = [arg(k) for k, on in (("gated_mlp", gated_mlp), ("non_embedding", non_embedding)) if on]
            if not tied_embeddings:
                switches.append("--untied-embeddings" if cli_names else "tied_embeddings=False")
            dims = ", ".join([f"{arg(k)} {v}" for k, v in given_dims.items()] + switches)
            return f"the model shape ({dims}: {params:.4g} parameters)"
        return f"{arg(name)} {values[name]:g}"

    if target_loss is not None:
        if given:
            raise ValueError(
                f"{arg('target_loss')} and {arg(given[0])} are mutually exclusive: a target loss fixes the whole run"
            )
        if not target_loss > chinchilla.E:
            raise ValueError(
                f"{arg('target_loss')} must be > {chinchilla.E:g} (the law's irreducible loss E): the law cannot "
                f"reach {target_loss:g}"
            )
        # Hoffmann 2022 (eq. 2 on the eq. 4 frontier): N_opt(ℓ) = (A(1+α/β)/(ℓ−E))^(1/α) is 1 at ℓ = E + A(1+α/β)
        one_param_loss = chinchilla.E + chinchilla.A * (1.0 + chinchilla.alpha / chinchilla.beta)
        if target_loss > one_param_loss:
            raise ValueError(
                f"{arg('target_loss')} must be below {one_param_loss:.4g} nats/token, the loss that a "
                f"compute-optimal model of {MIN_PARAMS:g} parameter reaches under {law_label}: any "
                f"higher target is met by less than one parameter; got {target_loss:g}"
            )
        blame = said("target_loss")
        opt = _solve(lambda: chinchilla.optimal_for_loss(target_loss), blame, "the cheapest run reaching it")
        n, d = opt.params, opt.tokens
        _trainable("the cheapest run reaching it", n, d, blame)
        mode = "target_loss"
    elif len(given) == 3:
        raise ValueError(
            f"{arg('flops')}, {arg('params')} and {arg('tokens')}: give at most two, the third follows (a model shape "
            f"counts as {arg('params')})"
        )
    elif not given:
        raise ValueError(
            f"nothing to plan: give {arg('flops')}, {arg('params')}, {arg('tokens')}, {arg('target_loss')} or a "
            "model shape"
        )
    else:
        mode = "+".join(given)
        blame = " and ".join(said(k) for k in given)
        if given == ["flops"]:
            opt = _solve(lambda: chinchilla.compute_optimal(flops), blame, "the compute-optimal run")
            n, d = opt.params, opt.tokens
            # Hoffmann 2022, eq. 4: N_opt = G·(C/6)^a is one parameter at C = 6·G^(−1/a)
            one_param = 6.0 * math.exp(min(-chinchilla.log_G / chinchilla.params_exponent, 700.0))
            hint = f" (under {law_label}, at least {one_param:.3g} FLOPs for one parameter)" if n < MIN_PARAMS else ""
            _trainable("the compute-optimal run", n, d, blame, hint)
        elif given == ["params"]:
            n = params
            d = _solve(lambda: chinchilla.optimal_for_params(params), blame, "the compute-optimal run").tokens
            _trainable("the compute-optimal run for that model", n, d, blame)
        elif given == ["tokens"]:
            n = _solve(lambda: chinchilla.optimal_for_tokens(tokens), blame, "the compute-optimal run").params
            d = tokens
            _trainable("the model for which those tokens are compute-optimal", n, d, blame)
        elif given == ["params", "tokens"]:
            n, d = params, tokens
        elif given == ["flops", "params"]:
            n, d = params, flops / (fpt or 6.0 * params)
            if d < 1:
                raise ValueError(
                    f"{blame}: the budget buys {_many(d, 'training token')} for that model; give more "
                    f"{arg('flops')} or a smaller model"
                )
        else:  # flops + tokens
            n, d = flops / (6.0 * tokens), tokens
            if n < MIN_PARAMS:
                raise ValueError(
                    f"{blame}: the budget leaves a model of {_many(n, 'parameter')} for those tokens; give "
                    f"more {arg('flops')} or fewer {arg('tokens')}"
                )
    fpt = fpt or 6.0 * n  # Kaplan 2020, Table 1: C ≈ 6N per training token
    total_flops = flops if flops is not None else fpt * d
    _check_finite({"params": n, "tokens": d, "flops": total_flops}, arg)

    loss = chinchilla.loss(n, d)
    same_loss = None
    if loss > chinchilla.E:
        same_loss = _solve(
            lambda: chinchilla.optimal_for_loss(loss), blame, "the compute-optimal run for the same loss"
        )
        _trainable(
            f"the compute-optimal run reaching the same loss ({loss:.4g} nats/token)",
            same_loss.params,
            same_loss.tokens,
            blame,
        )
    best = _solve(lambda: chinchilla.compute_optimal(total_flops), blame, "the compute-optimal run")
    _trainable(f"the compute-optimal run for the same {total_flops:.3g} FLOPs", best.params, best.tokens, blame)
    runs = [("the planned run", n, d)]
    if abs(best.params / n - 1.0) > 1e-6:
        runs.append(("the compute optimum for its FLOPs", best.params, best.tokens))
    extrapolated = _extrapolation(law_label, fitted, runs)
    if extrapolated:
        notes.add(extrapolated)
    result: dict[str, Any] = {
        "mode": mode,
        "law": {**chinchilla.to_dict(), "source": source},
        **_run(n, d, loss, total_flops),
        "flops_per_token": fpt,
        "flops_convention": model["flops_convention"] if model else "6N",
        "compute_overhead": chinchilla.compute_overhead(n, d),
        "same_loss_optimum": _run(same_loss.params, same_loss.tokens, same_loss.loss) if same_loss else None,
        "compute_optimum": _run(best.params, best.tokens, best.loss, total_flops),
        "model": model,
        "data": _data(data_law, n, d, total_flops, unique_tokens, arg, notes) if unique_tokens is not None else None,
        "inference": _inference(chinchilla, n, d, loss, inference_tokens, arg)
        if inference_tokens is not None
        else None,
        "hardware": _hardware(total_flops, gpu, num_gpus, mfu, peak_flops, dtype, arg),
        "batch": None,
        "warnings": notes.messages,
    }
    if batch_size is not None:
        if seq_len is None:
            raise ValueError(
                f"{arg('batch_size')} needs {arg('seq_len')}: a step is batch_size sequences of seq_len tokens"
            )
        per_step = batch_size * seq_len
        steps = math.ceil(d / per_step)
        hardware = result["hardware"]
        result["batch"] = {
            "batch_size": batch_size,
            "seq_len": seq_len,
            "tokens_per_step": per_step,
            "steps": steps,
            "seconds_per_step": hardware["wall_clock_hours"] * 3600.0 / steps if hardware else None,
        }
    _check_finite(result, arg)
    if not cli_names:  # the command line prints result["warnings"] itself
        for category, message in notes.items:
            warnings.warn(message, category, stacklevel=2)
    return result
