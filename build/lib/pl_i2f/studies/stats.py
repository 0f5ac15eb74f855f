"""Small statistics the studies and the audit share (no torch import of their own)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (a string of one too), else ``None``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def spearman(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Spearman's ρ (:func:`scipy.stats.spearmanr`) over the pairs where both values are finite numbers (None and
    NaN are skipped); NaN for fewer than 3 such pairs or a constant side."""
    from scipy.stats import spearmanr

    numbers = ((finite_number(p), finite_number(q)) for p, q in zip(a, b))
    pairs = [(x, y) for x, y in numbers if x is not None and y is not None]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return math.nan
    return float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)
