"""Scaling laws: predicted loss from model size and training tokens, and the compute-optimal allocation.

Units everywhere: ``params`` are parameters (total, unless a law says non-embedding), ``tokens`` are training
tokens, ``flops`` are training FLOPs (C = 6·N·D unless stated), ``loss`` is nats per token.

Every function is vectorised over numpy arrays (arguments broadcast together) and returns plain floats for
scalar arguments. Bad input raises ``ValueError`` naming the argument; no result is ever NaN, and no returned
``Allocation`` holds inf (a ``ValueError`` naming the inputs instead).

The laws are formulas: they answer for any positive input, also far outside the runs they were fitted on.
``fitted_range(law)`` says where a preset was fitted (``FittedRange``, with the paper); ``lightning_scaling.plan``
warns outside it and refuses advice of under one parameter or one token per parameter.
Pure numpy: this module imports neither torch, Lightning, Triton nor scipy.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import numpy as np

from lightning_scaling.argument_checks import fraction, non_negative_float, one_of, positive_array, positive_float

ArrayLike: TypeAlias = float | np.ndarray
_F = TypeVar("_F", bound=Callable[..., Any])

PF_DAY_FLOPS = 8.64e19  # 1 PF-day = 1e15 FLOP/s × 86400 s (Kaplan 2020, §1.1)


def _no_overflow_warnings(func: _F) -> _F:
    """Astronomical inputs may overflow to inf (a valid answer, never NaN): do not warn about it."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(over="ignore", under="ignore", divide="ignore"):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _out(value: np.ndarray) -> ArrayLike:
    """A 0-d array becomes a Python float; arrays stay arrays."""
    return float(value) if np.ndim(value) == 0 else value


def _broadcast(**named: np.ndarray) -> list[np.ndarray]:
    try:
        return list(np.broadcast_arrays(*named.values()))
    except ValueError:
        shapes = ", ".join(f"{k} {np.shape(v)}" for k, v in named.items())
        raise ValueError(f"{' and '.join(named)} must broadcast together, got shapes {shapes}") from None


@dataclass(frozen=True)
class Allocation:
    """A training run: ``params`` (parameters), ``tokens`` (training tokens), ``flops`` (training FLOPs,
    6·N·D), ``loss`` (predicted, nats/token). ``epochs`` and ``unique_tokens`` are set by the
    data-constrained optimum only. Fields are floats, or arrays when the inputs were arrays."""

    params: ArrayLike
    tokens: ArrayLike
    flops: ArrayLike
    loss: ArrayLike
    epochs: ArrayLike | None = None
    unique_tokens: ArrayLike | None = None

    @property
    def tokens_per_param(self) -> ArrayLike:
        """Training tokens per parameter (about 20 at the Chinchilla optimum)."""
        return _out(np.asarray(self.tokens, dtype=float) / np.asarray(self.params, dtype=float))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields plus ``tokens_per_param`` (arrays become lists)."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["tokens_per_param"] = self.tokens_per_param
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in out.items()}


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise ValueError(f"name must be a string (the law's label in messages), got {name!r}")


def _allocation(
    params: np.ndarray, tokens: np.ndarray, loss: np.ndarray, blame: str, **extra: np.ndarray
) -> Allocation:
    """An Allocation of finite, positive params, tokens, FLOPs and ``extra``; else a ValueError blaming ``blame``."""
    for value in (params, tokens):
        if not (np.all(np.isfinite(value)) and np.all(value > 0)):
            raise ValueError(f"{blame} out of range: the optimal parameters or tokens leave the floating-point range")
    for key, value in extra.items():
        if not (np.all(np.isfinite(value)) and np.all(value > 0)):
            raise ValueError(f"{blame} out of range: the optimum's {key} leave the floating-point range")
    # Chinchilla's compute approximation C = 6·N·D (Hoffmann 2022, §3 / Kaplan 2020, Table 1)
    with np.errstate(over="ignore"):
        flops = 6.0 * params * tokens
    if not np.all(np.isfinite(flops)):
        raise ValueError(f"{blame} out of range: the optimum's FLOPs (6·N·D) leave the floating-point range")
    return Allocation(
        params=_out(params),
        tokens=_out(tokens),
        flops=_out(flops),
        loss=_out(loss),
        **{k: _out(v) for k, v in extra.items()},
    )


# ----------------------------------------------------------------------------------------------------------
# Chinchilla form
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, eq. 2), N total parameters, D tokens."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "E", non_negative_float("E", self.E))
        for key in ("A", "B", "alpha", "beta"):
            object.__setattr__(self, key, positive_float(key, getattr(self, key)))
        _check_name(self.name)

    # --- frontier constants --------------------------------------------------------------------------
    @property
    def G(self) -> float:
        """G = (alpha·A/(beta·B))^(1/(alpha+beta)) (Hoffmann 2022, eq. 4); may overflow: prefer ``log_G``."""
        return math.exp(self.log_G)

    @property
    def log_G(self) -> float:
        """log G, computed in logs so that any valid constants give a finite value (Hoffmann 2022, eq. 4)."""
        return (math.log(self.alpha) + math.log(self.A) - math.log(self.beta) - math.log(self.B)) / (
            self.alpha + self.beta
        )

    @property
    def params_exponent(self) -> float:
        """a in N_opt ∝ C^a: beta/(alpha+beta) (Hoffmann 2022, eq. 4)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def tokens_exponent(self) -> float:
        """b in D_opt ∝ C^b: alpha/(alpha+beta) (Hoffmann 2022, eq. 4)."""
        return self.alpha / (self.alpha + self.beta)

    # --- loss ----------------------------------------------------------------------------------------
    def _log_excess(self, params: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """log(L - E), computed without overflow."""
        return np.logaddexp(
            math.log(self.A) - self.alpha * np.log(params), math.log(self.B) - self.beta * np.log(tokens)
        )

    @_no_overflow_warnings
    def loss(self, params: ArrayLike, tokens: ArrayLike) -> ArrayLike:
        """Predicted loss (nats/token) of a model with ``params`` parameters trained on ``tokens`` tokens."""
        n, d = _broadcast(params=positive_array("params", params), tokens=positive_array("tokens", tokens))
        return _out(self._loss(n, d))

    def _loss(self, n: np.ndarray, d: np.ndarray) -> np.ndarray:
        # Hoffmann 2022, eq. 2: L = E + A/N^α + B/D^β
        return self.E + self.A * n**-self.alpha + self.B * d**-self.beta

    # --- optima --------------------------------------------------------------------------------------
    @_no_overflow_warnings
    def compute_optimal(self, flops: ArrayLike) -> Allocation:
        """The loss-minimising (params, tokens) for a budget of ``flops`` training FLOPs, C = 6·N·D."""
        c = positive_array("flops", flops)
        # Hoffmann 2022, eq. 4: N_opt = G·(C/6)^a, D_opt = G⁻¹·(C/6)^b
        log_c6 = np.log(c) - math.log(6.0)
        n = np.exp(self.log_G + self.params_exponent * log_c6)
        d = np.exp(self.tokens_exponent * log_c6 - self.log_G)
        return _allocation(n, d, self._loss(n, d), "flops")

    def _tokens_on_frontier(self, n: np.ndarray) -> np.ndarray:
        # eq. 4 optimum ⇔ α·A/N^α = β·B/D^β (stationarity of L on C = 6ND; Hoffmann 2022, App. D.2)
        return np.exp((-(self.alpha + self.beta) * self.log_G + self.alpha * np.log(n)) / self.beta)

    def _params_on_frontier(self, d: np.ndarray) -> np.ndarray:
        # same stationarity condition as above, solved for N
        return np.exp(((self.alpha + self.beta) * self.log_G + self.beta * np.log(d)) / self.alpha)

    @_no_overflow_warnings
    def optimal_for_params(self, params: ArrayLike) -> Allocation:
        """The compute-optimal run for a model of ``params`` parameters: the tokens at which it is optimal."""
        n = positive_array("params", params)
        d = self._tokens_on_frontier(n)
        return _allocation(n, d, self._loss(n, d), "params")

    @_no_overflow_warnings
    def optimal_for_tokens(self, tokens: ArrayLike) -> Allocation:
        """The compute-optimal run that trains on ``tokens`` tokens: the model size for which they are optimal."""
        d = positive_array("tokens", tokens)
        n = self._params_on_frontier(d)
        return _allocation(n, d, self._loss(n, d), "tokens")

    def _check_target(self, loss: Any, name: str = "loss") -> np.ndarray:
        target = positive_array(name, loss)
        if not np.all(target > self.E):
            raise ValueError(
                f"{name} must be > E = {self.E:g} (the law's irreducible loss): the law cannot reach {loss!r}"
            )
        return target

    @_no_overflow_warnings
    def optimal_for_loss(self, loss: ArrayLike) -> Allocation:
        """The cheapest run (fewest FLOPs) that reaches a target ``loss`` (nats/token, must exceed E)."""
        excess = self._check_target(loss) - self.E
        log_excess = np.log(excess)
        # Hoffmann 2022 (eq. 2 on the eq. 4 frontier; docs/math.md §2):
        # N = (A(1+α/β)/(ℓ−E))^(1/α), D = (B(1+β/α)/(ℓ−E))^(1/β)
        n = np.exp((math.log(self.A * (1.0 + self.alpha / self.beta)) - log_excess) / self.alpha)
        d = np.exp((math.log(self.B * (1.0 + self.beta / self.alpha)) - log_excess) / self.beta)
        return _allocation(n, d, self.E + excess, "loss")

    @_no_overflow_warnings
    def compute_overhead(self, params: ArrayLike, tokens: ArrayLike) -> ArrayLike:
        """Extra training compute (a fraction: 0 = optimal, 0.208 = 20.8% more) that the run (``params``,
        ``tokens``) spends against the compute-optimal run reaching the same loss. Independent of scale
        for a given N/N_opt (de Vries 2023)."""
        n, d = _broadcast(params=positive_array("params", params), tokens=positive_array("tokens", tokens))
        log_excess = self._log_excess(n, d)
        # optimal run for that loss (docs/math.md §2 target-loss formulas), in logs;
        # overhead = N·D/(N*·D*) − 1 (de Vries 2023)
        log_n_opt = (math.log(self.A * (1.0 + self.alpha / self.beta)) - log_excess) / self.alpha
        log_d_opt = (math.log(self.B * (1.0 + self.beta / self.alpha)) - log_excess) / self.beta
        ratio = np.log(n) + np.log(d) - log_n_opt - log_d_opt
        return _out(np.maximum(np.expm1(np.minimum(ratio, 700.0)), 0.0))

    # --- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with ``kind`` = "chinchilla"; read back with ``from_dict`` or ``load_law``."""
        return {"kind": "chinchilla", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChinchillaLaw:
        """Build from ``to_dict()`` output; extra keys are ignored."""
        return _from_dict(cls, "chinchilla", d, required=_REQUIRED["chinchilla"])


def _from_dict(cls: type, kind: str, d: Any, required: tuple[str, ...] = (), where: str = "d") -> Any:
    """``cls`` from a dict of its fields; ``where`` names the dict in messages ("d", "the file")."""
    if not isinstance(d, dict):
        raise ValueError(
            f"{where} must be a dict (a JSON object) of a law's constants, the output of to_dict(); got {_json_type(d)}"
        )
    if "kind" in d and d["kind"] != kind:
        raise ValueError(f"{where}['kind'] must be {kind!r} for {cls.__name__}, got {d['kind']!r}")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{where} lacks the key(s) {', '.join(map(repr, missing))} that a {cls.__name__} needs")
    values = {f.name: d[f.name] for f in fields(cls) if f.name in d}
    for key, value in values.items():
        if key == "name":
            if not isinstance(value, str):
                raise ValueError(f"{where}['name'] must be a string, got {_json_type(value)} {value!r}")
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{where}[{key!r}] must be a number, got {_json_type(value)} {value!r}")
    return cls(**values)


def _json_type(value: Any) -> str:
    """How a JSON reader would call ``value``'s type: object, array, string, number, boolean or null."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, numbers.Real) else type(value).__name__


# Hoffmann et al. 2022, eq. 10 (approach 3, printed fit)
HOFFMANN_2022 = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, name="hoffmann")
# Besiroglu et al. 2024 (arXiv 2404.10102), refit of approach 3 on Hoffmann's Figure 4: ~20 tokens/param
BESIROGLU_2024 = ChinchillaLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658, name="besiroglu")
# Muennighoff et al. 2023 (arXiv 2305.16264), App. A: single-epoch C4 fit
MUENNIGHOFF_2023 = ChinchillaLaw(
    E=math.exp(0.6254804),
    A=math.exp(6.255414),
    B=math.exp(7.3049974),
    alpha=0.3526596,
    beta=0.3526596,
    name="muennighoff",
)
DEFAULT_LAW = BESIROGLU_2024

LAWS: dict[str, ChinchillaLaw] = {
    "hoffmann": HOFFMANN_2022,
    "besiroglu": BESIROGLU_2024,
    "muennighoff": MUENNIGHOFF_2023,
}

# Old preset names that still work, with a FutureWarning (shown to end users by default, unlike a
# DeprecationWarning, which Python hides unless the call comes from __main__). "epoch" (after Epoch AI, the
# authors of Besiroglu et al. 2024) read like a training epoch in every message that named the law.
DEPRECATED_LAW_NAMES: dict[str, str] = {"epoch": "besiroglu"}


def deprecated_law_name_message(name: str, flag: str = "law") -> str:
    """The deprecation notice for an old preset ``name`` given as argument ``flag``."""
    new = DEPRECATED_LAW_NAMES[name]
    return (
        f"{flag} {name!r} is deprecated and will be removed in a future release: the preset is now "
        f"{new!r} (Besiroglu et al. 2024); use {flag} {new!r}"
    )


def get_law(name: str) -> ChinchillaLaw:
    """A preset by name (case-insensitive): "hoffmann" (Hoffmann 2022), "besiroglu" (Besiroglu 2024, the
    default), "muennighoff" (Muennighoff 2023). The old name "epoch" still gives "besiroglu", with a FutureWarning."""
    key = name.strip().lower() if isinstance(name, str) else name
    if isinstance(key, str) and key in DEPRECATED_LAW_NAMES:
        warnings.warn(deprecated_law_name_message(key), FutureWarning, stacklevel=2)
        key = DEPRECATED_LAW_NAMES[key]
    return LAWS[one_of("law", key, tuple(LAWS))]


# ----------------------------------------------------------------------------------------------------------
# Where the presets were fitted
# ----------------------------------------------------------------------------------------------------------

# How far past its fitted range a law is used before ``lightning_scaling.plan`` warns: one decade either side.
# Hoffmann et al. 2022 (§4) checked their law with Chinchilla itself, 70B parameters on 1.4T tokens, about 4x
# past their largest fitted run; a decade leaves room for a step of that kind and flags anything further.
EXTRAPOLATION_MARGIN = 10.0


class ExtrapolationWarning(UserWarning):
    """A law answered outside the range of runs it was fitted on (its numbers are extrapolations)."""


@dataclass(frozen=True)
class FittedRange:
    """The runs a law was fitted on: ``params`` (parameters) and ``tokens`` (training tokens), each a
    (smallest, largest) pair; a bound the source does not give is None. ``source`` says where it comes from."""

    params: tuple[float | None, float | None]
    tokens: tuple[float | None, float | None]
    source: str = ""

    def __post_init__(self) -> None:
        for key in ("params", "tokens"):
            pair = getattr(self, key)
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"{key} must be a (smallest, largest) pair, got {pair!r}")
            lo, hi = (None if v is None else positive_float(key, v) for v in pair)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{key} must be (smallest, largest), got {pair!r}")
            object.__setattr__(self, key, (lo, hi))
        if not isinstance(self.source, str):
            raise ValueError(f"source must be a string, got {self.source!r}")

    def describe(self) -> str:
        """E.g. "70M to 16B parameters and 5B to 500B tokens"."""

        def span(pair: tuple[float | None, float | None], unit: str) -> str:
            lo, hi = pair
            if lo is None and hi is None:
                return f"any number of {unit}"
            if lo is None:
                return f"up to {_si(hi)} {unit}"
            return f"at least {_si(lo)} {unit}" if hi is None else f"{_si(lo)} to {_si(hi)} {unit}"

        return f"{span(self.params, 'parameters')} and {span(self.tokens, 'tokens')}"

    def outside(self, params: float, tokens: float, margin: float = EXTRAPOLATION_MARGIN) -> list[str]:
        """What of (``params``, ``tokens``) lies more than ``margin`` times beyond the range, as phrases
        ("2.8e+11 parameters, over 10x the largest fitted (16B)"); empty when both lie within."""
        params, tokens = positive_float("params", params), positive_float("tokens", tokens)
        margin = positive_float("margin", margin)
        found = []
        for value, pair, unit in ((params, self.params, "parameters"), (tokens, self.tokens, "tokens")):
            lo, hi = pair
            unit = unit[:-1] if f"{value:.3g}" == "1" else unit
            if lo is not None and value < lo / margin:
                found.append(f"{value:.3g} {unit}, under 1/{margin:g} of the smallest fitted ({_si(lo)})")
            elif hi is not None and value > hi * margin:
                found.append(f"{value:.3g} {unit}, over {margin:g}x the largest fitted ({_si(hi)})")
        return found

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: {"params": [lo, hi], "tokens": [lo, hi], "source": ...}."""
        return {"params": list(self.params), "tokens": list(self.tokens), "source": self.source}

    @classmethod
    def from_dict(cls, d: Any) -> FittedRange:
        """Build from ``to_dict()`` output."""
        if not isinstance(d, dict) or "params" not in d or "tokens" not in d:
            raise ValueError(f"d must be a dict with 'params' and 'tokens' pairs, got {d!r}")
        return cls(params=tuple(d["params"]), tokens=tuple(d["tokens"]), source=d.get("source", ""))


def _si(value: float | None) -> str:
    """1.6e10 -> "16B", 7e7 -> "70M", 5e11 -> "500B" (K, M, B, T: thousand, million, billion, trillion)."""
    if value is None:
        return "?"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


# Hoffmann et al. 2022 (arXiv 2203.15556), abstract and §3: over 400 models of 70M to over 16B parameters,
# trained on 5B to 500B tokens. Approach 3 (the printed law) fits the final losses of those runs.
HOFFMANN_2022_FITTED_RANGE = FittedRange(
    params=(7e7, 1.6e10), tokens=(5e9, 5e11), source="Hoffmann et al. 2022, abstract"
)
# Besiroglu et al. 2024 (arXiv 2404.10102), §2: a refit on data extracted from Hoffmann et al.'s Figure 4, a
# subset of the same runs, so the same range at most.
BESIROGLU_2024_FITTED_RANGE = FittedRange(
    params=(7e7, 1.6e10),
    tokens=(5e9, 5e11),
    source="Besiroglu et al. 2024 refit the runs of Hoffmann et al. 2022, abstract",
)
# Muennighoff et al. 2023 (arXiv 2305.16264), abstract: runs of up to 9B parameters and 900B training tokens
# (the smallest are not stated there, so no lower bound).
MUENNIGHOFF_2023_FITTED_RANGE = FittedRange(
    params=(None, 9e9), tokens=(None, 9e11), source="Muennighoff et al. 2023, abstract"
)

_PRESET_RANGES = (
    (HOFFMANN_2022, HOFFMANN_2022_FITTED_RANGE),
    (BESIROGLU_2024, BESIROGLU_2024_FITTED_RANGE),
    (MUENNIGHOFF_2023, MUENNIGHOFF_2023_FITTED_RANGE),
)


def fitted_range(law: Any) -> FittedRange | None:
    """Where a preset law was fitted (matched by its constants, whatever its ``name``); None for any other law.
    A ``DataConstrainedLaw`` gets the range of its single-epoch constants."""
    if isinstance(law, DataConstrainedLaw):
        law = law.base_law
    if not isinstance(law, ChinchillaLaw):
        return None
    constants = (law.E, law.A, law.B, law.alpha, law.beta)
    for preset, found in _PRESET_RANGES:
        if constants == (preset.E, preset.A, preset.B, preset.alpha, preset.beta):
            return found
    return None


# ----------------------------------------------------------------------------------------------------------
# Kaplan et al. 2020
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KaplanLaw:
    """Kaplan et al. 2020 (arXiv 2001.08361), WebText2, N non-embedding parameters, loss in nats/token.

    ``alpha_n, n_c, alpha_d, d_c``: the joint L(N, D) fit (eq. 1.5). ``*_single``: the one-variable fits
    L(N) (eq. 1.1) and L(D) (eq. 1.2). ``alpha_c_min, c_c_min_pf_days``: L(C_min) (eq. 1.3, C in PF-days).
    ``b_star, alpha_b``: critical batch size (§5.1, tokens). ``n_opt_coefficient, n_opt_exponent``: N_opt(C)
    (eq. 1.7, C in PF-days).
    """

    alpha_n: float = 0.076
    n_c: float = 6.4e13
    alpha_d: float = 0.103
    d_c: float = 1.8e13
    alpha_n_single: float = 0.076
    n_c_single: float = 8.8e13
    alpha_d_single: float = 0.095
    d_c_single: float = 5.4e13
    alpha_c_min: float = 0.050
    c_c_min_pf_days: float = 3.1e8
    b_star: float = 2e8
    alpha_b: float = 0.21
    n_opt_coefficient: float = 1.3e9
    n_opt_exponent: float = 0.73
    name: str = "kaplan"

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "name":
                object.__setattr__(self, f.name, positive_float(f.name, getattr(self, f.name)))
        _check_name(self.name)

    @_no_overflow_warnings
    def loss(self, params: ArrayLike, tokens: ArrayLike) -> ArrayLike:
        """L(N, D) for ``params`` non-embedding parameters trained on ``tokens`` tokens (early-stopped)."""
        n, d = _broadcast(params=positive_array("params", params), tokens=positive_array("tokens", tokens))
        # Kaplan 2020, eq. 1.5: L = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D
        return _out(((self.n_c / n) ** (self.alpha_n / self.alpha_d) + self.d_c / d) ** self.alpha_d)

    @_no_overflow_warnings
    def loss_params(self, params: ArrayLike) -> ArrayLike:
        """L(N): loss of ``params`` non-embedding parameters trained to convergence on ample data."""
        n = positive_array("params", params)
        return _out((self.n_c_single / n) ** self.alpha_n_single)  # Kaplan 2020, eq. 1.1

    @_no_overflow_warnings
    def loss_tokens(self, tokens: ArrayLike) -> ArrayLike:
        """L(D): loss of a large model trained on ``tokens`` tokens with early stopping."""
        d = positive_array("tokens", tokens)
        return _out((self.d_c_single / d) ** self.alpha_d_single)  # Kaplan 2020, eq. 1.2

    @_no_overflow_warnings
    def loss_compute(self, flops: ArrayLike) -> ArrayLike:
        """L(C_min): loss at the compute-efficient frontier for ``flops`` training FLOPs."""
        c_pf_days = positive_array("flops", flops) / PF_DAY_FLOPS
        return _out((self.c_c_min_pf_days / c_pf_days) ** self.alpha_c_min)  # Kaplan 2020, eq. 1.3

    @_no_overflow_warnings
    def critical_batch_size(self, loss: ArrayLike) -> ArrayLike:
        """B_crit(L) in tokens for a loss in nats/token."""
        lo = positive_array("loss", loss)
        return _out(self.b_star / lo ** (1.0 / self.alpha_b))  # Kaplan 2020, eq. 5.3 / §5.1

    @_no_overflow_warnings
    def optimal_params(self, flops: ArrayLike) -> ArrayLike:
        """N_opt(C): compute-efficient non-embedding parameters for ``flops`` training FLOPs."""
        c_pf_days = positive_array("flops", flops) / PF_DAY_FLOPS
        return _out(self.n_opt_coefficient * c_pf_days**self.n_opt_exponent)  # Kaplan 2020, eq. 1.7 / §6.1

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with ``kind`` = "kaplan"."""
        return {"kind": "kaplan", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KaplanLaw:
        """Build from ``to_dict()`` output; missing constants keep their defaults, extra keys are ignored."""
        return _from_dict(cls, "kaplan", d)


# ----------------------------------------------------------------------------------------------------------
# Repeated data: Muennighoff et al. 2023
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConstrainedLaw:
    """Muennighoff et al. 2023 (arXiv 2305.16264): the Chinchilla form with effective data D' and
    effective parameters N' that discount repeated epochs and excess parameters. Defaults: their C4 fit."""

    E: float = MUENNIGHOFF_2023.E
    A: float = MUENNIGHOFF_2023.A
    B: float = MUENNIGHOFF_2023.B
    alpha: float = MUENNIGHOFF_2023.alpha
    beta: float = MUENNIGHOFF_2023.beta
    r_star_d: float = 15.387756  # Muennighoff 2023, App. A (eq. 17)
    r_star_n: float = 5.309743  # Muennighoff 2023, App. A (eq. 17)
    name: str = "muennighoff"

    def __post_init__(self) -> None:
        checked = ChinchillaLaw(self.E, self.A, self.B, self.alpha, self.beta)  # validates the shared constants
        for key in ("E", "A", "B", "alpha", "beta"):
            object.__setattr__(self, key, getattr(checked, key))
        for key in ("r_star_d", "r_star_n"):
            object.__setattr__(self, key, positive_float(key, getattr(self, key)))
        _check_name(self.name)

    @classmethod
    def from_chinchilla(
        cls, law: ChinchillaLaw, r_star_d: float = 15.387756, r_star_n: float = 5.309743
    ) -> DataConstrainedLaw:
        """Another Chinchilla-form law with Muennighoff's repetition decay constants."""
        if not isinstance(law, ChinchillaLaw):
            raise ValueError(f"law must be a ChinchillaLaw, got {type(law).__name__}")
        return cls(law.E, law.A, law.B, law.alpha, law.beta, r_star_d, r_star_n, name=law.name)

    @property
    def base_law(self) -> ChinchillaLaw:
        """The single-epoch Chinchilla law with the same E, A, B, alpha, beta."""
        return ChinchillaLaw(self.E, self.A, self.B, self.alpha, self.beta, name=self.name)

    @staticmethod
    def _effective(unique: np.ndarray, repeats: np.ndarray, r_star: float) -> np.ndarray:
        # Muennighoff 2023, eq. 5/6: U + U·R*·(1 − exp(−R/R*))
        return unique * (1.0 + r_star * -np.expm1(-repeats / r_star))

    def _effective_tokens(self, d: np.ndarray, u: np.ndarray) -> np.ndarray:
        u_d = np.minimum(u, d)  # unique tokens actually seen
        return self._effective(u_d, np.maximum(d / u_d - 1.0, 0.0), self.r_star_d)

    def _effective_params(self, n: np.ndarray, u: np.ndarray) -> np.ndarray:
        # U_N = min(N, N_opt(U)): the compute-optimal size for U tokens (Muennighoff 2023, §3.1, eq. 6)
        u_n = np.minimum(n, self.base_law._params_on_frontier(u))
        return self._effective(u_n, np.maximum(n / u_n - 1.0, 0.0), self.r_star_n)

    @_no_overflow_warnings
    def effective_tokens(self, tokens: ArrayLike, unique_tokens: ArrayLike) -> ArrayLike:
        """D': the number of fresh tokens worth as much as ``tokens`` drawn from ``unique_tokens`` repeated."""
        d, u = _broadcast(
            tokens=positive_array("tokens", tokens), unique_tokens=positive_array("unique_tokens", unique_tokens)
        )
        return _out(self._effective_tokens(d, u))

    @_no_overflow_warnings
    def effective_params(self, params: ArrayLike, unique_tokens: ArrayLike) -> ArrayLike:
        """N': the parameters that still pay off when only ``unique_tokens`` unique tokens exist."""
        n, u = _broadcast(
            params=positive_array("params", params), unique_tokens=positive_array("unique_tokens", unique_tokens)
        )
        return _out(self._effective_params(n, u))

    @_no_overflow_warnings
    def repetition_value(self, tokens: ArrayLike, unique_tokens: ArrayLike) -> ArrayLike:
        """Worth of the next repeated token against a fresh one after ``tokens`` tokens drawn from
        ``unique_tokens`` unique ones: dD'/dD = exp(−R_D/R*_D) (1 during the first epoch)."""
        d, u = _broadcast(
            tokens=positive_array("tokens", tokens), unique_tokens=positive_array("unique_tokens", unique_tokens)
        )
        return _out(np.exp(-np.maximum(d / u - 1.0, 0.0) / self.r_star_d))  # derivative of Muennighoff 2023, eq. 5

    def epochs_at_value(self, value: float) -> float:
        """Epochs after which a repeated token is worth less than ``value`` (in (0, 1)) of a fresh one:
        1 + R*_D·ln(1/value), from dD'/dD = exp(−R_D/R*_D) (Muennighoff 2023, eq. 5). At 0.01 (about 72
        epochs with R*_D = 15.39) D' has reached 99% of its ceiling U·(1 + R*_D): more epochs change nothing."""
        return 1.0 + self.r_star_d * math.log(1.0 / fraction("value", value, inclusive_high=False))

    def _loss(self, n: np.ndarray, d: np.ndarray, u: np.ndarray) -> np.ndarray:
        # Muennighoff 2023, eq. 7: L = E + A/N'^α + B/D'^β
        return (
            self.E
            + self.A * self._effective_params(n, u) ** -self.alpha
            + self.B * self._effective_tokens(d, u) ** -self.beta
        )

    @_no_overflow_warnings
    def loss(self, params: ArrayLike, tokens: ArrayLike, unique_tokens: ArrayLike) -> ArrayLike:
        """Predicted loss (nats/token) of ``params`` parameters trained on ``tokens`` tokens that repeat
        ``unique_tokens`` unique tokens (tokens/unique_tokens epochs)."""
        n, d, u = _broadcast(
            params=positive_array("params", params),
            tokens=positive_array("tokens", tokens),
            unique_tokens=positive_array("unique_tokens", unique_tokens),
        )
        return _out(self._loss(n, d, u))

    @_no_overflow_warnings
    def compute_optimal(self, flops: ArrayLike, unique_tokens: ArrayLike) -> Allocation:
        """The loss-minimising (params, tokens) for ``flops`` training FLOPs (C = 6·N·D) when only
        ``unique_tokens`` unique tokens exist; the allocation carries ``epochs`` and ``unique_tokens``.

        A vectorised 1-D search along each iso-FLOP line (log-spaced grid, then repeated zooming)."""
        c, u = _broadcast(
            flops=positive_array("flops", flops), unique_tokens=positive_array("unique_tokens", unique_tokens)
        )
        base = self.base_law
        log_n0 = base.log_G + base.params_exponent * (np.log(c) - math.log(6.0))  # eq. 4 optimum (Hoffmann 2022)
        log_c6 = np.log(c) - math.log(6.0)
        # repetition only ever moves the optimum to smaller N; stay clear of float underflow
        lo, hi = np.maximum(log_n0 - 30.0, -700.0), np.maximum(log_n0 + 8.0, -690.0)
        points = 257
        for _ in range(12):
            grid = lo[..., None] + (hi - lo)[..., None] * np.linspace(0.0, 1.0, points)
            values = self._loss(np.exp(grid), np.exp(log_c6[..., None] - grid), u[..., None])
            best = np.argmin(values, axis=-1)[..., None]
            step = (hi - lo) / (points - 1)
            centre = np.take_along_axis(grid, best, axis=-1)[..., 0]
            lo, hi = centre - step, centre + step
            points = 33
            if np.all(step < 1e-12):
                break
        n, d = np.exp(centre), np.exp(log_c6 - centre)
        return _allocation(n, d, self._loss(n, d, u), "flops and unique_tokens", epochs=d / u, unique_tokens=u)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with ``kind`` = "data_constrained"."""
        return {"kind": "data_constrained", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConstrainedLaw:
        """Build from ``to_dict()`` output; missing constants keep their C4 defaults, extra keys are ignored."""
        return _from_dict(cls, "data_constrained", d)


# ----------------------------------------------------------------------------------------------------------
# Inference-aware optimum: Sardana et al. 2023
# ----------------------------------------------------------------------------------------------------------


@_no_overflow_warnings
def inference_optimal(law: ChinchillaLaw, loss: ArrayLike, inference_tokens: ArrayLike) -> Allocation:
    """The (params, training tokens) that reach ``loss`` (nats/token) with the fewest training plus
    inference FLOPs, 6·N·D_train + 2·N·D_inference, when the model will then process ``inference_tokens``
    tokens (Sardana et al. 2023). With ``inference_tokens`` = 0 it is ``law.optimal_for_loss(loss)``.
    The returned ``flops`` are the training FLOPs only; inference costs 2·params·inference_tokens more."""
    if not isinstance(law, ChinchillaLaw):
        raise ValueError(f"law must be a ChinchillaLaw, got {type(law).__name__}")
    target = law._check_target(loss)
    try:
        t = np.asarray(inference_tokens, dtype=float)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(
            f"inference_tokens must be a number >= 0 or an array of them, got {inference_tokens!r}"
        ) from None
    if t.size == 0 or not np.all(np.isfinite(t)) or not np.all(t >= 0):
        raise ValueError(f"inference_tokens must be finite and >= 0, got {inference_tokens!r}")
    target, t = _broadcast(loss=target, inference_tokens=t)
    a, b = law.alpha, law.beta
    k = target - law.E
    # Split ℓ − E = u + v with u = A/N^α, v = B/D^β. Stationarity of 6ND + 2N·T on L = ℓ (Sardana 2023, §3):
    # D·(α·u/(β·v) − 1) = T/3, whose left side falls monotonically in v on (0, v*], v* = α(ℓ−E)/(α+β).
    log_v_star = np.log(k * a / (a + b))  # the compute-optimal split (T = 0)
    log_v_lo, log_v_hi = log_v_star - 300.0, log_v_star
    log_target = np.log(np.where(t > 0, t, 1.0) / 3.0)
    for _ in range(120):
        mid = 0.5 * (log_v_lo + log_v_hi)
        v = np.exp(mid)
        slack = np.maximum(a * k - (a + b) * v, 1e-300)
        log_h = (math.log(law.B) - mid) / b + np.log(slack) - np.log(b * v)
        too_small = log_h < log_target  # below T/3: v too large, the model too big
        log_v_hi = np.where(too_small, mid, log_v_hi)
        log_v_lo = np.where(too_small, log_v_lo, mid)
    log_v = np.where(t > 0, 0.5 * (log_v_lo + log_v_hi), log_v_star)
    v = np.exp(log_v)
    u = k - v
    n = (law.A / u) ** (1.0 / a)
    d = np.exp((math.log(law.B) - log_v) / b)
    return _allocation(n, d, target, "loss and inference_tokens")


# ----------------------------------------------------------------------------------------------------------
# Reading a law back
# ----------------------------------------------------------------------------------------------------------

_KINDS: dict[str, type] = {"chinchilla": ChinchillaLaw, "kaplan": KaplanLaw, "data_constrained": DataConstrainedLaw}
_REQUIRED: dict[str, tuple[str, ...]] = {"chinchilla": ("E", "A", "B", "alpha", "beta")}


def _law_from_dict(d: Any, where: str) -> ChinchillaLaw | KaplanLaw | DataConstrainedLaw:
    if not isinstance(d, dict):
        raise ValueError(
            f"{where} must be a dict (a JSON object) of a law's constants, the output of to_dict(); got {_json_type(d)}"
        )
    kind = d.get("kind", "chinchilla")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ValueError(f"{where}['kind'] must be one of {', '.join(map(repr, _KINDS))}, got {kind!r}")
    return _from_dict(_KINDS[kind], kind, d, _REQUIRED.get(kind, ()), where)


def law_from_dict(d: dict[str, Any]) -> ChinchillaLaw | KaplanLaw | DataConstrainedLaw:
    """Any law from its ``to_dict()`` output, by its ``kind`` key (a Chinchilla law when ``kind`` is absent)."""
    return _law_from_dict(d, "d")


_LAW_FILE_HINT = "a law file is the JSON that `lightning-scaling fit --out` or a law's to_dict() writes"


def _read_law_json(path: str | os.PathLike[str]) -> Any:
    """The parsed JSON of a law file; ValueError naming the file and the problem."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike naming a law file, got {path!r}")
    where = f"law file {os.fspath(path)!r}"
    try:
        raw = Path(path).read_bytes()
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        reason = getattr(err, "strerror", None) or str(err)
        raise ValueError(f"{where} cannot be read: {reason}") from None
    if not raw.strip():
        raise ValueError(f"{where} is empty; {_LAW_FILE_HINT}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{where} is not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); {_LAW_FILE_HINT}"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{where} is not JSON ({err.msg} at line {err.lineno}, column {err.colno}); {_LAW_FILE_HINT}"
        ) from None
    except (ValueError, RecursionError) as err:  # an integer too long to read, or nesting too deep
        raise ValueError(f"{where} is not JSON a law can come from ({type(err).__name__}: {err})") from None


def load_law(path: str | os.PathLike[str]) -> ChinchillaLaw | KaplanLaw | DataConstrainedLaw:
    """Read a law from a JSON file holding a law's ``to_dict()`` (extra keys, such as a fit's report, are
    ignored). Raises ``ValueError`` naming the file and the problem when it cannot be read (missing, not
    UTF-8, empty, not JSON) or holds no valid law (not an object, unknown ``kind``, missing keys, a constant
    that is not a number, or is NaN, inf or out of range)."""
    data = _read_law_json(path)
    try:
        return _law_from_dict(data, "the file")
    except ValueError as err:
        raise ValueError(f"law file {os.fspath(path)!r} holds no valid law: {err}") from None


def load_fitted_range(path: str | os.PathLike[str]) -> FittedRange | None:
    """The range of runs recorded in a law file written by ``lightning-scaling fit --out`` (its
    ``fit.fitted_range``), or None when the file records none. ValueError naming the file as ``load_law``."""
    data = _read_law_json(path)
    recorded = (
        data.get("fit", {}).get("fitted_range")
        if isinstance(data, dict) and isinstance(data.get("fit"), dict)
        else None
    )
    if recorded is None:
        return None
    try:
        return FittedRange.from_dict(recorded)
    except ValueError as err:
        raise ValueError(f"law file {os.fspath(path)!r} records no valid fitted range: {err}") from None
