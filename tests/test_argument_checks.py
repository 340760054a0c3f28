"""lightning_scaling.argument_checks: the shared checks behind every "x must be ..." ValueError."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_scaling.argument_checks import boolean


@pytest.mark.parametrize("value", ["no", "yes", 0, 1, None, "False", [], np.float64(1.0)])
def test_boolean_accepts_only_booleans(value):
    with pytest.raises(ValueError, match=r"^gated_mlp must be True or False"):
        boolean("gated_mlp", value)


def test_boolean_returns_python_bools():
    assert boolean("x", True) is True and boolean("x", False) is False
    assert boolean("x", np.bool_(True)) is True and boolean("x", np.bool_(False)) is False
