"""Training FLOPs of a micro-batch from its shape: measured for a few shapes, predicted for the rest.

Measuring FLOPs (torch's ``FlopCounterMode`` around the real forward and backward) slows the step it watches, so
``FlopCounter`` measures only a few shapes. For a batch of ``b`` sequences of length ``s`` a transformer's training
FLOPs are exactly

    F(b, s) = p·b + q·b·s + r·b·s²

(per-sample work such as a classification head; every matmul over the tokens; the attention scores, quadratic in
the sequence length), so three measured shapes of one *family* (the same batch structure with other batch sizes
and sequence lengths) determine the rest. A language model has no per-sample term (p = 0), so a family starts
with the two token terms. The counter also says which of a measured shape's FLOPs were attention (scores and
P·V, the r·b·s² term) and which were the rest (q·b·s): with that split, one measured shape determines the
formula and the next one checks it. When the check fails the split is dropped (two measured shapes then
determine the token terms and a third checks them); when that check fails too, the family takes the per-sample
term as well (one more measurement). Each failure drops one assumption and costs no measurement beyond those
the narrower formula needed. A prediction is trusted only after it has predicted a measured shape within
``tolerance`` (validation), and a check validates only the part of the formula it tests: a shape the measured
shapes alone already determine (same sequence length, another batch size) does not check the split, and its
miss is the measured totals' (the per-sample term is added). Once the measured shapes determine the formula on
their own, it is fitted to them alone (the split agreed with them at the check). Until then
new shapes are measured, up to ``max_measured`` in all. A shape whose features lie outside what the
measurements determine (say a new sequence length when every measurement had the same one and no split) is
measured, never extrapolated, while measurements are left.

Pure Python and numpy: no torch, no Lightning. Units: FLOPs (a multiply-add is 2), per micro-batch on one rank.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FlopsByShape", "ShapeFamily"]


TOKEN_TERMS = (1, 2)  # b·s and b·s²: a language model's formula
ALL_TERMS = (0, 1, 2)  # with the per-sample term p·b


def _features(batch_size: int, seq_len: int, terms: tuple[int, ...] = ALL_TERMS) -> np.ndarray:
    b, s = float(batch_size), float(seq_len)
    return np.array([b, b * s, b * s * s])[list(terms)]


def _span(x: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the row space of ``x`` (rows: scaled features)."""
    if not len(x):
        return np.zeros((0, x.shape[1] if x.ndim == 2 else 0))
    _, sv, vt = np.linalg.svd(x, full_matrices=False)
    rank = int((sv > sv[0] * 1e-9).sum()) if sv.size and sv[0] > 0 else 0
    return vt[:rank]


def _in_span(basis: np.ndarray | None, f: np.ndarray) -> bool:
    if basis is None or not len(basis):
        return False
    residual = f - basis.T @ (basis @ f)
    return float(np.linalg.norm(residual)) <= 1e-7 * float(np.linalg.norm(f))


@dataclass
class ShapeFamily:
    """The measured shapes of one batch structure and the formula fitted to them (model and hardware FLOPs)."""

    points: list[tuple[int, int, int, int]] = field(default_factory=list)  # (b, s, model, hardware)
    terms: tuple[int, ...] = TOKEN_TERMS  # which of p·b, q·b·s, r·b·s² the formula has (see the module docstring)
    validated: bool = False
    worst_error: float = 0.0  # largest relative error of a prediction checked against a measurement
    # per point: its (model, hardware) FLOPs of attention (the r·b·s² term), None when the counter could not say
    attention: list[tuple[int, int] | None] = field(default_factory=list)
    use_split: bool = True  # whether the attention split may determine the formula (dropped after a failed check)
    split_in_use: bool = False  # whether the current fit needed the split (the points alone do not determine it)
    _coef: np.ndarray | None = None  # [2, len(terms)]: model and hardware coefficients
    _basis: np.ndarray | None = None  # orthonormal basis of what the fit determines (scaled features)
    _point_basis: np.ndarray | None = None  # the same, from the measured shapes' totals alone
    _scale: np.ndarray | None = None  # feature scaling used by the fit

    def fit(self) -> None:
        x = np.stack([_features(b, s, self.terms) for b, s, _, _ in self.points])
        y = np.array([[m, h] for _, _, m, h in self.points], dtype=float)
        scale = np.abs(x).max(axis=0)
        scale[scale == 0] = 1.0
        self._scale = scale
        self._point_basis = _span(x / scale)
        self.split_in_use = False
        if self.use_split and len(self._point_basis) < len(self.terms) and 2 in self.terms:
            quadratic = np.array([term == 2 for term in self.terms])
            rows, values = [], []
            for (b, s, model, hardware), attention in zip(self.points, self.attention, strict=True):
                if attention is None:
                    continue
                f = _features(b, s, self.terms)
                rows += [np.where(quadratic, 0.0, f), np.where(quadratic, f, 0.0)]
                values += [[model - attention[0], hardware - attention[1]], list(attention)]
            if rows:
                x, y = np.vstack([x, *rows]), np.vstack([y, values])
                self.split_in_use = len(_span(x / scale)) > len(self._point_basis)
        coef, *_ = np.linalg.lstsq(x / scale, y, rcond=None)
        self._coef = (coef / scale[:, None]).T
        self._basis = _span(x / scale)

    def determined(self, batch_size: int, seq_len: int) -> bool:
        """Whether the measurements determine F at this shape (its features lie in their span)."""
        if self._scale is None:
            return False
        return _in_span(self._basis, _features(batch_size, seq_len, self.terms) / self._scale)

    def determined_by_points(self, batch_size: int, seq_len: int) -> bool:
        """Whether the measured totals alone, without the attention split, determine F at this shape."""
        if self._scale is None:
            return False
        return _in_span(self._point_basis, _features(batch_size, seq_len, self.terms) / self._scale)

    def predict(self, batch_size: int, seq_len: int) -> tuple[int, int]:
        assert self._coef is not None
        model, hardware = self._coef @ _features(batch_size, seq_len, self.terms)
        return max(round(float(model)), 0), max(round(float(hardware)), 0)  # numpy 1.x: round(np.float64) is a float


class FlopsByShape:
    """Measured FLOPs by exact shape, and a fitted formula per shape family (see the module docstring).

    Args:
        max_measured: shapes measured at most, over all families (each measurement slows one step).
        tolerance: a prediction within this relative error of a measurement validates its family's formula.
    """

    def __init__(self, max_measured: int = 8, tolerance: float = 0.002) -> None:
        if isinstance(max_measured, bool) or not isinstance(max_measured, int) or max_measured < 1:
            raise ValueError(f"max_measured must be a whole number >= 1, got {max_measured!r}")
        if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
            raise ValueError(f"tolerance must be a fraction in (0, 1), got {tolerance!r}")
        self.max_measured = max_measured
        self.tolerance = float(tolerance)
        self.exact: dict[Hashable, tuple[int, int]] = {}  # measured shapes
        self.predicted: dict[Hashable, tuple[int, int]] = {}  # shapes whose FLOPs were predicted, each once
        self.families: dict[Hashable, ShapeFamily] = {}
        self.measured = 0

    def lookup(self, key: Hashable, family: Hashable, batch_size: int, seq_len: int) -> tuple[int, int] | None:
        """(model, hardware) FLOPs of this shape when measured before or predictable with trust; else None
        (measure it, or see :meth:`fallback` when no measurement is left)."""
        known = self.exact.get(key) or self.predicted.get(key)
        if known is not None:
            return known
        fam = self.families.get(family)
        if fam is not None and fam.validated and fam.determined(batch_size, seq_len):
            self.predicted[key] = fam.predict(batch_size, seq_len)
            return self.predicted[key]
        return None

    @property
    def predicted_shapes(self) -> int:
        """Distinct shapes whose FLOPs were predicted rather than measured."""
        return len(self.predicted)

    def should_measure(self) -> bool:
        return self.measured < self.max_measured

    def fallback(self, key: Hashable, family: Hashable, batch_size: int, seq_len: int) -> tuple[int, int] | None:
        """Best estimate once no measurement is left: the family's formula where it is determined (after one
        measured shape, by its attention split, unchecked), else scaled per token from the family's nearest
        measured shape; None when the family was never measured."""
        fam = self.families.get(family)
        if fam is None or not fam.points:
            return None
        if fam.determined(batch_size, seq_len):
            estimate = fam.predict(batch_size, seq_len)
        else:
            tokens = batch_size * seq_len
            b, s, model, hardware = min(fam.points, key=lambda p: abs(p[0] * p[1] - tokens))
            ratio = tokens / max(b * s, 1)
            estimate = int(model * ratio), int(hardware * ratio)
        self.predicted[key] = estimate
        return estimate

    def record(
        self,
        key: Hashable,
        family: Hashable,
        batch_size: int,
        seq_len: int,
        model: int,
        hardware: int,
        attention: tuple[int, int] | None = None,
    ) -> float | None:
        """Add a measurement (``attention``: the (model, hardware) FLOPs of its attention calls, when the counter
        could tell them apart). Returns the relative error of the family's prediction for it (None when the
        family could not predict it yet, or checked a narrower formula); a small error validates the family, a
        large one un-validates it and drops the family's narrowest assumption."""
        self.exact[key] = (int(model), int(hardware))
        self.measured += 1
        fam = self.families.setdefault(family, ShapeFamily())
        error = None
        if fam.points and fam.determined(batch_size, seq_len):
            predicted = fam.predict(batch_size, seq_len)[0]
            error = abs(predicted - model) / max(abs(model), 1)
            # a shape the totals alone determine says nothing about the split the formula also rests on
            tests_all = not fam.split_in_use or not fam.determined_by_points(batch_size, seq_len)
            if error > self.tolerance:
                fam.validated = False
                if fam.split_in_use and tests_all:
                    fam.use_split = False  # the attention split does not hold for this family
                    error = None  # a check of the split, not of the formula the points give
                elif fam.terms != ALL_TERMS:
                    # the token terms alone do not explain it: add the per-sample term (and trust the measured
                    # totals alone from now on: a model with per-sample work is not the plain language model the
                    # split was for)
                    fam.terms, fam.use_split = ALL_TERMS, False
                    error = None  # a check of the narrower formula, not of the one in use
                else:
                    fam.worst_error = max(fam.worst_error, error)
            else:
                fam.validated = fam.validated or tests_all
                fam.worst_error = max(fam.worst_error, error)
        else:  # a shape the formula could not reach: the fit gains a dimension, which must be checked afresh
            fam.validated = False
        fam.points.append((int(batch_size), int(seq_len), int(model), int(hardware)))
        fam.attention.append(None if attention is None else (int(attention[0]), int(attention[1])))
        fam.fit()
        return error
