"""lightning_scaling.estimators.noise_scale, the pure estimator, against the closed-form linear-regression problem of
docs/math.md §5."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_scaling.estimators.noise_scale import NoiseScaleEstimator, noise_scale, unbiased_estimates

D, SIGMA, DELTA_NORM = 16, 1.0, 1.0
TRUE_B_SIMPLE = D + 1 + D * SIGMA**2 / DELTA_NORM**2  # docs/math.md §5: B_simple = d + 1 + dσ²/|δ|²


def simulate(rng: np.random.Generator, steps: int, micro: int, k: int) -> np.ndarray:
    """Per step: (mean squared norm of the k micro-batch gradients, squared norm of their mean).

    Linear regression x ~ N(0, I_d), y = xᵀw* + ε, loss ½(xᵀw − y)² at w = w* + δ: the per-example gradient is
    (xᵀδ − ε)x.
    """
    delta = np.zeros(D)
    delta[0] = DELTA_NORM
    x = rng.standard_normal((steps, k, micro, D))
    eps = SIGMA * rng.standard_normal((steps, k, micro))
    per_example = ((x @ delta) - eps)[..., None] * x
    g_micro = per_example.mean(axis=2)  # (steps, k, D)
    g_big = g_micro.mean(axis=1)
    return np.stack([(g_micro**2).sum(-1).mean(-1), (g_big**2).sum(-1)], axis=1)


def feed(est: NoiseScaleEstimator, data: np.ndarray, micro: int, k: int) -> None:
    for sq_small, sq_big in data:
        est.update(float(sq_small), float(sq_big), micro, micro * k)


def test_unbiased_estimates_invert_the_expectation() -> None:
    # E|G_B|² = |G|² + tr(Σ)/B: plugging the expectations in must give back |G|² and tr(Σ) exactly
    g, t = 2.5, 40.0
    got = unbiased_estimates(g + t / 4, g + t / 32, 4, 32)
    assert got == pytest.approx((g, t), rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-6, 1e6), st.floats(0, 1e6), st.integers(1, 512), st.integers(1, 64))
def test_unbiased_estimates_property(g: float, t: float, b_small: int, factor: int) -> None:
    b_big = b_small * (factor + 1)
    got_g, got_t = unbiased_estimates(g + t / b_small, g + t / b_big, b_small, b_big)
    assert got_g == pytest.approx(g, rel=1e-6, abs=1e-9 * (1 + t))
    assert got_t == pytest.approx(t, rel=1e-6, abs=1e-9 * (1 + g))


@pytest.mark.parametrize("b_small,b_big", [(4, 4), (8, 4), (0, 4)])
def test_unbiased_estimates_reject_bad_sizes(b_small: int, b_big: int) -> None:
    with pytest.raises(ValueError, match="b_big"):
        unbiased_estimates(1.0, 1.0, b_small, b_big)


def test_closed_form_within_four_standard_errors_and_biased_estimator_misses() -> None:
    rng = np.random.default_rng(0)
    micro, k = 4, 8  # B_big = 32 ≈ B_simple: single-step |G|² estimates are noisy and often negative
    data = simulate(rng, 3000, micro, k)
    est = NoiseScaleEstimator(ema_decay=0.995)
    feed(est, data, micro, k)
    e = est.estimate()
    assert e.measurements == 3000
    assert 0 < e.stderr < 0.2 * TRUE_B_SIMPLE  # the tolerance below is meaningful
    assert abs(e.b_simple - TRUE_B_SIMPLE) < 4 * e.stderr
    # the same data through a deliberately biased estimator: the mean of per-step ratios
    ratios = [t / g for g, t in (unbiased_estimates(s, b, micro, micro * k) for s, b in data)]
    biased = float(np.mean(ratios))
    assert abs(biased - TRUE_B_SIMPLE) > 4 * e.stderr
    # the per-step |G|² really is often negative here (docs/math.md §5), which is why ratios must not be averaged
    negative = np.mean([unbiased_estimates(s, b, micro, micro * k)[0] < 0 for s, b in data])
    assert negative > 0.01


def test_standard_error_is_calibrated() -> None:
    # 40 independent runs: the z-scores of the estimate against the truth have a spread near 1
    rng = np.random.default_rng(1)
    z = []
    for _ in range(40):
        est = NoiseScaleEstimator(ema_decay=0.99)
        feed(est, simulate(rng, 800, 8, 4), 8, 4)
        e = est.estimate()
        z.append((e.b_simple - TRUE_B_SIMPLE) / e.stderr)
    z = np.asarray(z)
    assert 0.6 < z.std() < 1.6
    assert abs(z.mean()) < 0.8


def test_bias_correction_and_first_steps() -> None:
    est = NoiseScaleEstimator(ema_decay=0.9)
    e = est.estimate()
    assert math.isnan(e.b_simple) and math.isnan(e.stderr) and e.measurements == 0
    est.update_estimates(2.0, 10.0)
    # bias-corrected: after one step the averages equal that step's values
    assert est.grad_sq == pytest.approx(2.0) and est.trace_cov == pytest.approx(10.0)
    assert est.b_simple == pytest.approx(5.0)
    assert math.isnan(est.stderr())  # fewer than three measurements
    est.update_estimates(-1.0, 10.0)
    est.update_estimates(-1.0, 10.0)
    assert est.grad_sq < 0 and math.isnan(est.b_simple)  # no ratio while |G|² is not positive
    assert est.effective_count() == pytest.approx((1 - 0.9**3) ** 2 * (1 - 0.81) / (0.01 * (1 - 0.9**6)))


def test_noise_scale_needs_positive_grad_sq() -> None:
    assert noise_scale(2.0, 8.0) == 4.0
    assert math.isnan(noise_scale(0.0, 8.0)) and math.isnan(noise_scale(-1.0, 8.0))
    assert math.isnan(noise_scale(1.0, math.inf))


def test_update_rejects_non_finite() -> None:
    est = NoiseScaleEstimator()
    with pytest.raises(ValueError, match="non-finite"):
        est.update(math.nan, 1.0, 4, 8)
    assert est.count == 0


def test_state_dict_round_trip_continues_exactly() -> None:
    rng = np.random.default_rng(2)
    data = simulate(rng, 60, 4, 4)
    a = NoiseScaleEstimator(0.95)
    feed(a, data[:30], 4, 4)
    b = NoiseScaleEstimator(0.95)
    b.load_state_dict(a.state_dict())
    feed(a, data[30:], 4, 4)
    feed(b, data[30:], 4, 4)
    assert a.state_dict() == b.state_dict()
    assert a.estimate() == b.estimate()


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "x", None, math.nan])
def test_ema_decay_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="ema_decay"):
        NoiseScaleEstimator(bad)  # type: ignore[arg-type]


def test_noise_module_is_pure() -> None:
    code = (
        "import sys, lightning_scaling.estimators.noise_scale; "
        "assert 'lightning' not in sys.modules and 'triton' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _line_sums(points: list[tuple[float, float, float]]) -> tuple[float, float, float, float, float]:
    """Σw, Σw·x, Σw·x², Σw·y, Σw·x·y over (x = 1/B, y = |G_B|², w) points."""
    return (
        sum(w for _, _, w in points),
        sum(w * x for x, _, w in points),
        sum(w * x * x for x, _, w in points),
        sum(w * y for _, y, w in points),
        sum(w * x * y for x, y, w in points),
    )


def test_least_squares_line_with_two_batch_sizes_is_the_two_batch_estimator() -> None:
    from lightning_scaling.estimators.noise_scale import least_squares_line

    # k micro-batches of 8 samples (each its own |G_8|²) against the step's |G_32|²: McCandlish's estimator with
    # the small-batch norms averaged
    small = [3.1, 2.7, 2.9, 3.3]
    points = [(1 / 8, y, 1.0) for y in small] + [(1 / 32, 1.6, 1.0)]
    got = least_squares_line(*_line_sums(points))
    want = unbiased_estimates(sum(small) / 4, 1.6, 8, 32)
    assert got == pytest.approx(want, rel=1e-12)
    # DDP: every rank adds 1/R of the same all-reduced point; the sums hold it once
    ranks = 4
    shared = [(1 / 32, 1.6, 1.0 / ranks)] * ranks
    assert least_squares_line(*_line_sums([(1 / 8, y, 1.0) for y in small] + shared)) == pytest.approx(want)


def test_least_squares_line_is_exact_on_the_expected_line_and_refuses_one_batch_size() -> None:
    from lightning_scaling.estimators.noise_scale import least_squares_line

    grad_sq, trace_cov = 0.7, 12.0
    points = [(1 / b, grad_sq + trace_cov / b, 1.0) for b in (4, 8, 12, 16, 64)]
    assert least_squares_line(*_line_sums(points)) == pytest.approx((grad_sq, trace_cov), rel=1e-12)
    assert least_squares_line(*_line_sums([(1 / 8, 2.0, 1.0), (1 / 8, 3.0, 1.0)])) is None
    assert least_squares_line(0.0, 0.0, 0.0, 0.0, 0.0) is None
