"""Scaling laws and fitting them: the laws with their published constants, compute-optimal allocations and the
inference-aware optimum (:mod:`.definitions`); the fitters, Chinchilla approaches 1-3 and Kaplan
(:mod:`.fitting`), on the batched multi-start optimiser (:mod:`.batched_bfgs`); the bootstrap over runs
(:mod:`.resampling`); reading runs from CSV files and CSVLogger directories (:mod:`.runs`); the plots
(:mod:`.plotting`, the ``plot`` extra).

Pure numpy (matplotlib only to plot); the fitters load when first used.
May import: :mod:`lightning_scaling.argument_checks`, :mod:`lightning_scaling.metric_names`.
"""

from __future__ import annotations

from lightning_scaling.laws.definitions import (
    BESIROGLU_2024,
    DEFAULT_LAW,
    EXTRAPOLATION_MARGIN,
    HOFFMANN_2022,
    LAWS,
    MUENNIGHOFF_2023,
    PF_DAY_FLOPS,
    Allocation,
    ChinchillaLaw,
    DataConstrainedLaw,
    ExtrapolationWarning,
    FittedRange,
    KaplanLaw,
    fitted_range,
    get_law,
    inference_optimal,
    law_from_dict,
    load_fitted_range,
    load_law,
)
from lightning_scaling.lazy_imports import module_getattr

_LAZY = {
    "APPROACHES": ".fitting",
    "FrontierFit": ".fitting",
    "LawFit": ".fitting",
    "ScalingPoints": ".fitting",
    "UndeterminedLawError": ".fitting",
    "fit_approach1": ".fitting",
    "fit_approach2": ".fitting",
    "fit_approach3": ".fitting",
    "fit_kaplan": ".fitting",
    "optimum_at": ".fitting",
    "BootstrapResult": ".resampling",
    "bootstrap": ".resampling",
    "read_csv": ".runs",
    "read_csv_logger": ".runs",
    "read_points": ".runs",
    "plot_fit": ".plotting",
}

# the eager names as a literal, so that linters and type checkers see them re-exported; then the lazy ones
__all__ = [
    "BESIROGLU_2024",
    "DEFAULT_LAW",
    "EXTRAPOLATION_MARGIN",
    "HOFFMANN_2022",
    "LAWS",
    "MUENNIGHOFF_2023",
    "PF_DAY_FLOPS",
    "Allocation",
    "ChinchillaLaw",
    "DataConstrainedLaw",
    "ExtrapolationWarning",
    "FittedRange",
    "KaplanLaw",
    "fitted_range",
    "get_law",
    "inference_optimal",
    "law_from_dict",
    "load_fitted_range",
    "load_law",
]
__all__ += sorted(_LAZY)


__getattr__ = module_getattr(__name__, _LAZY)
