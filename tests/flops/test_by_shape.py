"""FlopsByShape: how many shapes it measures, and what it predicts, for formulas with and without a per-sample
term."""

from __future__ import annotations

import pytest

from lightning_scaling.flops.by_shape import ALL_TERMS, TOKEN_TERMS, FlopsByShape


def _run(flops, shapes: list[tuple[int, int]], max_measured: int = 8, attention=None) -> tuple[FlopsByShape, dict]:
    """Feed shapes as a training run would: look up, measure when unknown (``attention(b, s)``: the counter's
    attention FLOPs of the shape; None: the counter could not tell them apart)."""
    book = FlopsByShape(max_measured=max_measured)
    got = {}
    for b, s in shapes:
        known = book.lookup((b, s), "family", b, s)
        if known is None and book.should_measure():
            f = flops(b, s)
            split = None if attention is None else (attention(b, s), 2 * attention(b, s))
            book.record((b, s), "family", b, s, f, 2 * f, attention=split)
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


def _lm(b: int, s: int) -> int:
    return b * (6_000 * s + 48 * s * s)


def _lm_attention(b: int, s: int) -> int:
    return b * 48 * s * s


def test_with_the_attention_split_a_language_model_needs_one_shape_and_a_check() -> None:
    book, got = _run(_lm, PAD_TO_LONGEST, attention=_lm_attention)
    assert book.measured == 2
    fam = book.families["family"]
    assert fam.validated and fam.use_split and fam.worst_error < 1e-9  # (two points now determine it alone)
    assert all(got[k] == (_lm(*k), 2 * _lm(*k)) for k in got)


def test_a_wrong_split_is_dropped_at_the_check_for_no_extra_measurement() -> None:
    # a registered attention kernel not marked attention=True: the counter calls all of it linear
    book, got = _run(_lm, PAD_TO_LONGEST, attention=lambda b, s: 0)
    assert book.measured == 3  # as without a split: the check was the second shape the points needed anyway
    fam = book.families["family"]
    assert fam.validated and not fam.use_split and fam.terms == TOKEN_TERMS
    assert all(got[k] == (_lm(*k), 2 * _lm(*k)) for k in got)


def test_a_check_at_the_same_length_does_not_validate_the_split() -> None:
    # 8 x 17 then 4 x 17: the totals alone predict 4 x 17 (b scales everything), so it says nothing of the split
    book, _ = _run(_lm, [(8, 17), (4, 17)], attention=lambda b, s: 0)
    assert book.measured == 2 and not book.families["family"].validated
    book, got = _run(_lm, [(8, 17), (4, 17), (8, 33), (8, 9)], attention=lambda b, s: 0)
    assert book.measured == 4 and got[(8, 9)] == (_lm(8, 9), 2 * _lm(8, 9))


def test_a_miss_at_a_shape_the_totals_determine_is_not_blamed_on_the_split() -> None:
    def odd(b: int, s: int) -> int:  # not linear in b: 4 x 17 is not half of 8 x 17, whatever the split
        return 100 * b * b * s

    book, _ = _run(odd, [(8, 17), (4, 17)], attention=lambda b, s: 0)
    fam = book.families["family"]
    assert fam.terms == ALL_TERMS and not fam.use_split and not fam.validated


def test_a_per_sample_term_after_a_split_costs_what_it_did_without() -> None:
    def windowed(b: int, s: int) -> int:  # a [B, S + 1] window: the model sees s - 1 positions
        return b * (6_000 * (s - 1) + 48 * (s - 1) ** 2)

    book, got = _run(windowed, PAD_TO_LONGEST, attention=lambda b, s: b * 48 * (s - 1) ** 2)
    assert book.measured == 4  # split fails at the 2nd, token terms at the 3rd, the per-sample term holds at the 4th
    fam = book.families["family"]
    assert fam.terms == ALL_TERMS and fam.validated and not fam.use_split
    assert all(got[k] == (windowed(*k), 2 * windowed(*k)) for k in got)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_max_measured_is_checked(bad: object) -> None:
    with pytest.raises(ValueError, match="max_measured"):
        FlopsByShape(max_measured=bad)  # type: ignore[arg-type]
