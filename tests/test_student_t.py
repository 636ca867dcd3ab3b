"""Student's t upper tail and quantile against closed forms and table values."""

from __future__ import annotations

import math

import pytest

from cast_core.student_t import regularized_beta, upper_quantile, upper_tail


@pytest.mark.parametrize("t", [-30.0, -2.0, -0.3, 0.0, 0.7, 3.0, 250.0, 1e8])
def test_the_tail_matches_the_closed_forms_at_one_and_two_degrees_of_freedom(t: float) -> None:
    assert upper_tail(t, 1.0) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-10, abs=1e-15)
    assert upper_tail(t, 2.0) == pytest.approx(0.5 - t / (2.0 * math.sqrt(2.0 + t * t)), rel=1e-10, abs=1e-15)


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0, 4.0])
def test_many_degrees_of_freedom_give_the_normal_tail(t: float) -> None:
    assert upper_tail(t, 1e7) == pytest.approx(0.5 * math.erfc(t / math.sqrt(2.0)), rel=1e-5)


@pytest.mark.parametrize("dof,expected", [(1.0, 12.7062), (2.0, 4.3027), (3.0, 3.1824), (10.0, 2.2281), (30.0, 2.0423)])
def test_the_quantile_matches_the_table(dof: float, expected: float) -> None:
    assert upper_quantile(0.025, dof) == pytest.approx(expected, abs=1e-4)


def test_the_quantile_inverts_the_tail_far_out_and_for_fractional_degrees_of_freedom() -> None:
    far = 0.5 * math.erfc(10.0 / math.sqrt(2.0))  # z = 10: about 7.6e-24
    for dof in (0.3, 1.0, 1.7, 31.0):
        for tail in (0.3, 0.0228, far):
            assert upper_tail(upper_quantile(tail, dof), dof) == pytest.approx(tail, rel=1e-6)
    assert upper_quantile(0.5, 3.0) == 0.0
    assert regularized_beta(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-4)  # 1 - sum_{k<2} C(4,k) 0.4^k 0.6^(4-k)


@pytest.mark.parametrize("call", [lambda: upper_tail(1.0, 0.0), lambda: upper_quantile(0.6, 2.0), lambda: upper_quantile(0.1, -1.0)])
def test_bad_arguments_name_the_field(call) -> None:
    with pytest.raises(ValueError, match="dof|tail"):
        call()
