"""FlopsByShape: how many shapes it measures, and what it predicts, for formulas with and without a per-sample
term."""

from __future__ import annotations

import pytest

from lightning_scaling.flops.by_shape import ALL_TERMS, TOKEN_TERMS, FlopsByShape


def _run(flops, shapes: list[tuple[int, int]], max_measured: int = 8) -> tuple[FlopsByShape, dict]:
    """Feed shapes as a training run would: look up, measure when unknown."""
    book = FlopsByShape(max_measured=max_measured)
    got = {}
    for b, s in shapes:
        known = book.lookup((b, s), "family", b, s)
        if known is None and book.should_measure():
            f = flops(b, s)
            book.record((b, s), "family", b, s, f, 2 * f)
            known = (f, 2 * f)
        elif known is None:
            known = book.fallback((b, s), "family", b, s)
        got[(b, s)] = known
    return book, got


PAD_TO_LONGEST = [(8, s) for s in (17, 33, 9, 25, 41, 12, 64, 50, 3, 30, 19, 44)]


def test_a_language_model_needs_two_shapes_and_a_check() -> None:
    def lm(b: int, s: int) -> int:
        return b * (6_000 * s + 48 * s * s)

    book, got = _run(lm, PAD_TO_LONGEST)
    assert book.measured == 3
    assert book.families["family"].terms == TOKEN_TERMS and book.families["family"].validated
    assert book.families["family"].worst_error < 1e-9
    assert all(got[k] == (lm(*k), 2 * lm(*k)) for k in got)  # every prediction exact


def test_a_per_sample_term_is_found_with_one_more_measurement() -> None:
    def classifier(b: int, s: int) -> int:  # a pooled head: work per sample, not per token
        return b * (250_000 + 6_000 * s + 48 * s * s)

    book, got = _run(classifier, PAD_TO_LONGEST)
    assert book.measured == 4
    fam = book.families["family"]
    assert fam.terms == ALL_TERMS and fam.validated
    assert fam.worst_error < 1e-9  # the narrower formula's miss is not the formula in use's error
    assert all(got[k] == (classifier(*k), 2 * classifier(*k)) for k in got)


def test_a_formula_that_never_holds_stops_at_the_measurement_budget() -> None:
    def odd(b: int, s: int) -> int:
        return b * s**3

    book, _ = _run(odd, PAD_TO_LONGEST, max_measured=5)
    assert book.measured == 5 and not book.families["family"].validated
    # the shapes after the budget are the fallback's estimates, never trusted predictions
    assert book.predicted_shapes == len(PAD_TO_LONGEST) - 5


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_max_measured_is_checked(bad: object) -> None:
    with pytest.raises(ValueError, match="max_measured"):
        FlopsByShape(max_measured=bad)  # type: ignore[arg-type]
