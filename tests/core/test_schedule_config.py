"""core.schedule and core.config: hand-computable values."""

import math

import pytest

from voxreg.core.config import check_choice, check_int, check_number, check_positive
from voxreg.core.schedule import cosine_factor


def test_cosine_factor_endpoints_and_midpoint():
    assert cosine_factor(0.0) == 1.0
    assert cosine_factor(1.0) == pytest.approx(0.0, abs=1e-12)
    assert cosine_factor(0.5) == pytest.approx(0.5)
    assert cosine_factor(0.5, floor=0.1) == pytest.approx(0.55)
    assert cosine_factor(2.0, floor=0.1) == pytest.approx(0.1)  # clipped past the end


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "1", True, None])
def test_check_number_refuses_non_finite_and_non_numbers(value):
    with pytest.raises(ValueError, match="lam must be a finite number"):
        check_number("lam", value)


def test_bounds_name_the_field():
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got 0"):
        check_positive("lr", 0)
    assert check_positive("lr", 0, allow_zero=True) == 0.0
    with pytest.raises(ValueError, match=r"steps must be an int >= 1, got 0"):
        check_int("steps", 0, 1)
    with pytest.raises(ValueError, match=r"similarity must be one of ncc, mse, mi; got 'x'"):
        check_choice("similarity", "x", ("ncc", "mse", "mi"))
