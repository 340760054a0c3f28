"""lightning_scaling.laws.plotting: the fit's picture (three panels, a PNG)."""

from __future__ import annotations

import pytest
from helpers import SMALL_GRID, ladder
from helpers import TRUE_LAW as TRUE

from lightning_scaling.laws import fitting as F


def test_plot_fit_writes_three_panels(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the plot extra (matplotlib)")
    from lightning_scaling.laws.plotting import plot_fit

    n, d, loss = ladder(TRUE, noise=0.003, seed=6)
    law_fit = F.fit_approach3(n, d, loss, starts=SMALL_GRID)
    frontier = F.fit_approach2(n, d, loss)
    for name, fit in (("law.png", law_fit), ("frontier.png", frontier)):
        out = plot_fit(F.ScalingPoints.from_arrays(n, d, loss), fit, tmp_path / name)
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
