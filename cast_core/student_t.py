"""Student's t distribution's upper tail and its inverse, for any real degrees of freedom ``nu > 0``.

The speedup gate judges a ratio from a handful of drafted steps whose spread it
estimates from those same steps (``cast_core.gate``); with ``n_eff`` steps the
standardised error has ``nu = n_eff - 1`` degrees of freedom, and at ``nu = 1``
its 97.7 % point lies 13.7 standard errors out, not 2.

    Q(t; nu) = P(T > t) = I_x(nu / 2, 1 / 2) / 2,   x = nu / (nu + t^2)   (t >= 0)
    Q(t; nu) = 1 - Q(-t; nu)                                              (t < 0)

``I_x(a, b)`` is the regularized incomplete beta function, evaluated by its
continued fraction (modified Lentz); ``Q`` is computed without cancellation in
the far tail, and its inverse by bisection on ``log t``.
"""

from __future__ import annotations

import math
from functools import lru_cache

_TINY = 1e-300
_EPS = 1e-14


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of ``I_x(a, b)`` (modified Lentz), converging for ``x < (a + 1) / (a + b + 2)``."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``a, b > 0`` and ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def upper_tail(t: float, dof: float) -> float:
    """``Q(t; nu) = P(T > t)`` for Student's t with ``dof`` = ``nu > 0`` degrees of freedom."""
    if dof <= 0:
        raise ValueError(f"dof must be > 0; got {dof}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * regularized_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return tail if t >= 0 else 1.0 - tail


@lru_cache(maxsize=4096)
def _upper_quantile(tail: float, dof: float) -> float:
    lo, hi = -40.0, 700.0  # log t: Q(e^-40) is 1/2 to within 1e-17; Q(e^700) is at most about 1e-304 for nu >= 1e-3
    if upper_tail(math.exp(hi), dof) > tail:
        return math.inf
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if upper_tail(math.exp(mid), dof) > tail:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def upper_quantile(tail: float, dof: float) -> float:
    """The ``t`` with ``Q(t; nu) = tail`` (``0 < tail <= 1/2``): 0 at ``tail = 1/2``; ``inf`` where ``t`` exceeds
    ``e^700`` (``nu`` near 0). ``dof`` is rounded to 3 decimals, whose answers are cached."""
    if not 0.0 < tail <= 0.5:
        raise ValueError(f"tail must be in (0, 0.5]; got {tail}")
    if dof <= 0:
        raise ValueError(f"dof must be > 0; got {dof}")
    return 0.0 if tail == 0.5 else _upper_quantile(tail, max(round(dof, 3), 1e-3))
