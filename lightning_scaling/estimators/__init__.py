"""Streaming estimators the callbacks keep: the gradient noise scale (:mod:`.noise_scale`, McCandlish et al. 2018;
pure) and the count of distinct samples seen (:mod:`.distinct_samples`, a HyperLogLog sketch on torch tensors).

May import: :mod:`lightning_scaling.argument_checks`; never the callbacks or Lightning.
"""

from lightning_scaling.estimators.noise_scale import (
    NoiseScaleEstimate,
    NoiseScaleEstimator,
    least_squares_line,
    noise_scale,
    unbiased_estimates,
)

__all__ = ["NoiseScaleEstimate", "NoiseScaleEstimator", "least_squares_line", "noise_scale", "unbiased_estimates"]
