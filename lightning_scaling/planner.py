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
"""

from __future__ import annotations

import math
from typing import Any, Callable

from lightning_scaling import laws as _laws
from lightning_scaling._validation import fraction, one_of, positive_float, positive_int

_SHAPE = ("n_layer", "d_model", "n_head", "vocab_size")
FLOPS_CONVENTIONS = ("chinchilla", "kaplan", "palm")
DTYPES = ("bf16", "fp16", "tf32", "fp32", "fp8")


def _count(name: str, value: Any) -> float:
    """A count of FLOPs, parameters or tokens: finite and at least 1 (less is no model and no run)."""
    out = positive_float(name, value)
    if out < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
    return out


def _arg_namer(cli_names: bool) -> Callable[[str], str]:
    """How messages name an argument: ``unique_tokens`` (Python) or ``--unique-tokens`` (command line)."""
    return (lambda name: "--" + name.replace("_", "-")) if cli_names else (lambda name: name)


def _resolve_law(law: str | None, law_file: str | None, arg: Callable[[str], str]) -> tuple[Any, Any, str]:
    """(Chinchilla law, data-constrained law, source) from a preset name or a law file."""
    if law is not None and law_file is not None:
        raise ValueError(f"{arg('law')} and {arg('law_file')} are mutually exclusive: give a preset name or a file, not both")
    if law_file is None:
        chinchilla = _laws.DEFAULT_LAW if law is None else _laws.LAWS[one_of(arg("law"), law, tuple(_laws.LAWS))]
        return chinchilla, _laws.DataConstrainedLaw.from_chinchilla(chinchilla), "preset"
    try:
        loaded = _laws.load_law(law_file)
    except ValueError as err:
        raise ValueError(f"{arg('law_file')}: {err}") from None
    if isinstance(loaded, _laws.DataConstrainedLaw):
        return loaded.base_law, loaded, str(law_file)
    if isinstance(loaded, _laws.ChinchillaLaw):
        return loaded, _laws.DataConstrainedLaw.from_chinchilla(loaded), str(law_file)
    raise ValueError(f"{arg('law_file')} {str(law_file)!r} holds a {type(loaded).__name__}; plan needs a Chinchilla-form law")


def _run(n: float, d: float, loss: float, flops: float | None = None) -> dict[str, float]:
    return {
        "params": n,
        "tokens": d,
        "flops": 6.0 * n * d if flops is None else flops,  # Kaplan 2020 Table 1 / Hoffmann 2022: C ≈ 6ND
        "tokens_per_param": d / n,
        "loss": loss,
    }


def _model(shape: dict[str, Any], seq_len: int | None, d_ff: int | None, gated_mlp: bool, tied_embeddings: bool,
           non_embedding: bool, flops_convention: str | None, arg: Callable[[str], str],
           n_kv_head: int | None = None, head_dim: int | None = None) -> dict[str, Any]:
    missing = [arg(k) for k in (*_SHAPE, "seq_len") if (seq_len if k == "seq_len" else shape[k]) is None]
    if missing:
        needed = ", ".join(arg(k) for k in (*_SHAPE, "seq_len"))
        raise ValueError(f"{', '.join(missing)} missing: a model shape needs all of {needed}")
    if head_dim is None and shape["d_model"] % shape["n_head"]:
        raise ValueError(f"{arg('d_model')} must be divisible by {arg('n_head')}, got {shape['d_model']} and {shape['n_head']}")
    from lightning_scaling.flops import transformer_flops, transformer_params  # lazy: only shape mode needs it

    convention = one_of(arg("flops_convention"), flops_convention or "chinchilla", FLOPS_CONVENTIONS)
    if n_kv_head is not None and shape["n_head"] % n_kv_head:
        raise ValueError(f"{arg('n_head')} must be a multiple of {arg('n_kv_head')}, got {shape['n_head']} and {n_kv_head}")
    counts = transformer_params(shape["n_layer"], shape["d_model"], shape["vocab_size"], d_ff=d_ff,
                                gated_mlp=gated_mlp, tied_embeddings=tied_embeddings, n_head=shape["n_head"],
                                n_kv_head=n_kv_head, head_dim=head_dim)
    per_seq = transformer_flops(shape["n_layer"], shape["d_model"], shape["n_head"], seq_len, shape["vocab_size"],
                                d_ff=d_ff, gated_mlp=gated_mlp, convention=convention, n_kv_head=n_kv_head,
                                head_dim=head_dim)
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


def _hardware(flops: float, gpu: str | None, num_gpus: int | None, mfu: float | None, peak_flops: float | None,
              dtype: str | None, arg: Callable[[str], str]) -> dict[str, Any] | None:
    if gpu is not None and peak_flops is not None:
        raise ValueError(f"{arg('gpu')} and {arg('peak_flops')} are mutually exclusive: {arg('peak_flops')} replaces the table figure")
    if gpu is None and peak_flops is None:
        for name, value in (("mfu", mfu), ("num_gpus", num_gpus), ("dtype", dtype)):
            if value is not None:
                raise ValueError(f"{arg(name)} needs {arg('gpu')} or {arg('peak_flops')}: there is nothing to run on")
        return None
    if dtype is not None and gpu is None:
        raise ValueError(f"{arg('dtype')} needs {arg('gpu')}: it picks the table figure that {arg('peak_flops')} replaces")
    if gpu is not None:
        from lightning_scaling.hardware import DENSE_PEAK_FLOPS, GPU_ALIASES, canonical_gpu, dtype_key

        try:
            table = DENSE_PEAK_FLOPS[canonical_gpu(gpu)]
        except ValueError:
            raise ValueError(f"{arg('gpu')} must be one of {', '.join(sorted(GPU_ALIASES))}, got {gpu!r}") from None
        key = dtype_key(one_of(arg("dtype"), dtype or "bf16", DTYPES))
        if key not in table:
            raise ValueError(f"{arg('dtype')} for {gpu} must be one of {', '.join(table)}, got {dtype!r}")
        peak = table[key]
    else:
        peak = peak_flops
    num_gpus = 1 if num_gpus is None else num_gpus
    mfu = 0.4 if mfu is None else mfu
    achieved = peak * num_gpus * mfu  # MFU = achieved model FLOP/s / peak (PaLM, Chowdhery 2022, App. B)
    hours = flops / achieved / 3600.0 if achieved > 0 else math.inf
    if not math.isfinite(hours) or not math.isfinite(achieved):
        raise ValueError(f"{arg('peak_flops')}, {arg('num_gpus')} and {arg('mfu')} are out of range: the wall-clock overflows")
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


def _data(data_law: Any, n: float, d: float, flops: float, unique: float) -> dict[str, Any]:
    optimum = data_law.compute_optimal(flops, unique)
    return {
        "unique_tokens": unique,
        "epochs": d / unique,
        "effective_tokens": data_law.effective_tokens(d, unique),
        "effective_params": data_law.effective_params(n, unique),
        "loss": data_law.loss(n, d, unique),
        "repetition_value": data_law.repetition_value(d, unique),
        "optimum": {**_run(optimum.params, optimum.tokens, optimum.loss, flops), "epochs": optimum.epochs},
    }


def _inference(law: Any, n: float, d: float, loss: float, inference_tokens: float,
               arg: Callable[[str], str]) -> dict[str, Any]:
    if not loss > law.E:
        raise ValueError(f"{arg('inference_tokens')}: the run is so large that its predicted loss equals the law's E")
    alt = _laws.inference_optimal(law, loss, inference_tokens)

    def side(pn: float, pd: float) -> dict[str, float]:
        # Sardana et al. 2023, §3: total = 6·N·D_train + 2·N·D_inference
        train, infer = 6.0 * pn * pd, 2.0 * pn * inference_tokens
        return {"params": pn, "tokens": pd, "tokens_per_param": pd / pn, "training_flops": train,
                "inference_flops": infer, "total_flops": train + infer}

    planned, optimum = side(n, d), side(alt.params, alt.tokens)
    saved = max(planned["total_flops"] - optimum["total_flops"], 0.0)
    return {"inference_tokens": inference_tokens, "planned": planned, "optimum": optimum,
            "saved_flops": saved, "saved_fraction": saved / planned["total_flops"]}


def _check_finite(value: Any, arg: Callable[[str], str], path: str = "") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, arg, f"{path}.{key}" if path else key)
    elif isinstance(value, float) and not math.isfinite(value):
        inputs = ", ".join(arg(k) for k in ("flops", "params", "tokens"))
        raise ValueError(f"the result {path!r} overflowed: {inputs} are out of range")


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
    What is missing is taken at the law's optimum. ``law`` ("hoffmann", "epoch" (default), "muennighoff")
    or ``law_file`` (JSON of a law's ``to_dict()``) picks the law. Optional sections: ``unique_tokens``
    (repeated data, Muennighoff 2023), ``inference_tokens`` (Sardana 2023), ``gpu``/``peak_flops`` with
    ``num_gpus``, ``mfu`` (default 0.4), ``dtype`` (default bf16) for wall-clock, ``batch_size`` (sequences,
    with ``seq_len``) for steps. Messages name arguments as Python names, or as ``--flags`` when ``cli_names``.
    """
    arg = _arg_namer(cli_names)

    def optional(check: Callable[[str, Any], Any], name: str, value: Any) -> Any:
        return None if value is None else check(arg(name), value)

    flops = optional(_count, "flops", flops)
    params = optional(_count, "params", params)
    tokens = optional(_count, "tokens", tokens)
    target_loss = optional(positive_float, "target_loss", target_loss)
    shape = {k: optional(positive_int, k, v) for k, v in zip(_SHAPE, (n_layer, d_model, n_head, vocab_size))}
    seq_len = optional(positive_int, "seq_len", seq_len)
    d_ff = optional(positive_int, "d_ff", d_ff)
    n_kv_head = optional(positive_int, "n_kv_head", n_kv_head)
    head_dim = optional(positive_int, "head_dim", head_dim)
    unique_tokens = optional(positive_float, "unique_tokens", unique_tokens)
    inference_tokens = optional(positive_float, "inference_tokens", inference_tokens)
    num_gpus = optional(positive_int, "num_gpus", num_gpus)
    mfu = optional(fraction, "mfu", mfu)
    peak_flops = optional(positive_float, "peak_flops", peak_flops)
    batch_size = optional(positive_int, "batch_size", batch_size)
    for name, value in (("gated_mlp", gated_mlp), ("tied_embeddings", tied_embeddings), ("non_embedding", non_embedding)):
        if not isinstance(value, bool):
            raise ValueError(f"{arg(name)} must be True or False, got {value!r}")

    chinchilla, data_law, source = _resolve_law(law, law_file, arg)

    # --- the model: a shape, or a parameter count ----------------------------------------------------------
    model = None
    if any(v is not None for v in shape.values()):
        if params is not None:
            raise ValueError(f"{arg('params')} and a model shape ({', '.join(map(arg, _SHAPE))}) are mutually exclusive")
        model = _model(shape, seq_len, d_ff, gated_mlp, tied_embeddings, non_embedding, flops_convention, arg,
                       n_kv_head, head_dim)
        params = model["params"]
    else:
        extras = {"d_ff": d_ff is not None, "gated_mlp": gated_mlp, "n_kv_head": n_kv_head is not None,
                  "head_dim": head_dim is not None, "tied_embeddings": not tied_embeddings,
                  "non_embedding": non_embedding, "flops_convention": flops_convention is not None}
        for name, given in extras.items():
            if given:
                raise ValueError(f"{arg(name)} needs a model shape ({', '.join(map(arg, (*_SHAPE, 'seq_len')))})")
        if seq_len is not None and batch_size is None:
            raise ValueError(f"{arg('seq_len')} needs {arg('batch_size')} or a model shape: alone it changes nothing")
    fpt = model["flops_per_token"] if model else None  # analytic FLOPs per token, or 6N below

    # --- the run: (params, tokens, flops) --------------------------------------------------------------------
    given = [k for k, v in (("flops", flops), ("params", params), ("tokens", tokens)) if v is not None]
    if target_loss is not None:
        if given:
            raise ValueError(f"{arg('target_loss')} and {arg(given[0])} are mutually exclusive: a target loss fixes the whole run")
        if not target_loss > chinchilla.E:
            raise ValueError(f"{arg('target_loss')} must be > {chinchilla.E:g} (the law's irreducible loss E): the law cannot reach {target_loss:g}")
        opt = chinchilla.optimal_for_loss(target_loss)
        n, d = opt.params, opt.tokens
        mode = "target_loss"
    elif len(given) == 3:
        raise ValueError(f"{arg('flops')}, {arg('params')} and {arg('tokens')}: give at most two, the third follows (a model shape counts as {arg('params')})")
    elif not given:
        raise ValueError(f"nothing to plan: give {arg('flops')}, {arg('params')}, {arg('tokens')}, {arg('target_loss')} or a model shape")
    else:
        mode = "+".join(given)
        if given == ["flops"]:
            opt = chinchilla.compute_optimal(flops)
            n, d = opt.params, opt.tokens
        elif given == ["params"]:
            n, d = params, chinchilla.optimal_for_params(params).tokens
        elif given == ["tokens"]:
            n, d = chinchilla.optimal_for_tokens(tokens).params, tokens
        elif given == ["params", "tokens"]:
            n, d = params, tokens
        elif given == ["flops", "params"]:
            n, d = params, flops / (fpt or 6.0 * params)
        else:  # flops + tokens
            n, d = flops / (6.0 * tokens), tokens
    fpt = fpt or 6.0 * n  # Kaplan 2020, Table 1: C ≈ 6N per training token
    total_flops = flops if flops is not None else fpt * d
    _check_finite({"params": n, "tokens": d, "flops": total_flops}, arg)

    loss = chinchilla.loss(n, d)
    same_loss = chinchilla.optimal_for_loss(loss) if loss > chinchilla.E else None
    best = chinchilla.compute_optimal(total_flops)
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
        "data": _data(data_law, n, d, total_flops, unique_tokens) if unique_tokens is not None else None,
        "inference": _inference(chinchilla, n, d, loss, inference_tokens, arg) if inference_tokens is not None else None,
        "hardware": _hardware(total_flops, gpu, num_gpus, mfu, peak_flops, dtype, arg),
        "batch": None,
    }
    if batch_size is not None:
        if seq_len is None:
            raise ValueError(f"{arg('batch_size')} needs {arg('seq_len')}: a step is batch_size sequences of seq_len tokens")
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
    return result
