"""What an evaluation of the leakage monitor costs: :class:`ProductCost`, a line ``seconds ≈ a + b·vectors`` fitted
on the calls actually run (pure; no Lightning)."""

from __future__ import annotations

from typing import Any

import numpy as np

PRICE_DECAY = 0.7  # the weight of a price observation's fixed part relative to the next one (ProductCost)


def _decay_weights(count: int) -> list[float]:
    """``PRICE_DECAY`` to the power of each observation's age: the latest of ``count`` weighs 1."""
    return [PRICE_DECAY ** (count - 1 - i) for i in range(count)]


def _weighted_line(obs: list[tuple[float, float, float]], w: list[float]) -> tuple[float, float]:
    """(a, b) >= 0 minimising Σ w·(a·c + b·v − s)² over observations (c, v, s) (2×2 normal equations, clipped)."""
    scc = sum(k * c * c for k, (c, _, _) in zip(w, obs))
    svv = sum(k * v * v for k, (_, v, _) in zip(w, obs))
    scv = sum(k * c * v for k, (c, v, _) in zip(w, obs))
    scs = sum(k * c * s for k, (c, _, s) in zip(w, obs))
    svs = sum(k * v * s for k, (_, v, s) in zip(w, obs))
    det = scc * svv - scv * scv
    a = (scs * svv - svs * scv) / det if det > 0 else 0.0
    b = (svs * scc - scs * scv) / det if det > 0 else 0.0
    if a < 0:
        return 0.0, svs / svv
    if b < 0:
        return scs / scc, 0.0
    return a, b


class ProductCost:
    """Seconds of a call as ``a + b·vectors`` (here: an evaluation of ``vectors`` probes), least squares over
    those observed (``observe(calls, vectors, seconds)`` for ``calls`` calls with ``vectors`` in all): ``b`` from
    all of them alike, ``a`` from them weighted ``PRICE_DECAY`` times less each than the next — the cost drifts
    along a run (the first evaluations pay first touches of memory and caches that training evicts differently
    later), and what the next evaluation costs is nearer the last ones. With a single size observed the fixed
    part cannot be separated: ``b`` is then seconds/vectors (a = 0), which over-predicts larger calls of an
    overhead-bound model — the safe side."""

    def __init__(self, window: int = 16):
        self.window = window
        self.observations: list[tuple[float, float, float]] = []  # (calls, vectors, seconds)
        self._fit: tuple[float, float] | None = None  # the coefficients of these observations (a plan prices often)
        self._latest: tuple[float, float, float] | None = None  # the largest size, a line on the latest (predict)

    @property
    def known(self) -> bool:
        return bool(self.observations)

    def observe(self, calls: float, vectors: float, seconds: float) -> None:
        if calls > 0 and vectors > 0 and seconds >= 0:
            self.observations = [*self.observations, (float(calls), float(vectors), float(seconds))][-self.window:]
            self._fit = self._latest = None

    def coefficients(self) -> tuple[float, float]:
        """(a, b): seconds per product and per vector, both >= 0."""
        if not self.observations:
            raise ValueError("no product observed yet")
        if self._fit is None:
            self._fit = self._least_squares(self.observations)
        return self._fit

    @staticmethod
    def _least_squares(obs: list[tuple[float, float, float]]) -> tuple[float, float]:
        """The part per vector from every observation alike (a slope from sizes a few probes apart is noisy, and a
        noisy slope of 0 would price every probe set alike); the fixed part from the latest: the median of what
        each call left over, weighted by ``PRICE_DECAY`` (what drifts along a run is mostly the level, and one call
        slowed by a passing load should not price the next ones as dear)."""
        w = _decay_weights(len(obs))
        if len({round(v / c, 6) for c, v, _ in obs}) == 1:
            return 0.0, sum(k * s for k, (*_, s) in zip(w, obs)) / sum(k * v for k, (_, v, _) in zip(w, obs))
        _, b = _weighted_line(obs, [1.0] * len(obs))
        if b == 0:  # the cost looks fixed: its level from the latest
            return _weighted_line(obs, w)
        left_over = [(s - b * v) / c for c, v, s in obs]  # the weighted median of these
        a = float(np.quantile(left_over, 0.5, weights=[k * c for k, (c, _, _) in zip(w, obs)], method="inverted_cdf"))
        if a < 0:  # through the origin, from the latest
            return 0.0, sum(k * v * s for k, (_, v, s) in zip(w, obs)) / sum(k * v * v for k, (_, v, _) in zip(w, obs))
        return a, b

    def predict(self, calls: float, vectors: float) -> float:
        """Seconds of ``calls`` calls with ``vectors`` in all. Beyond the largest call seen, no less than a line
        fitted wholly on the latest observations predicts: a slope from every observation alike, bent by load that
        came since, would make a much larger call look cheap."""
        a, b = self.coefficients()
        fitted = a * calls + b * vectors
        if self._latest is None:  # (the largest call's size, and the line fitted on the latest)
            w = _decay_weights(len(self.observations))
            self._latest = (max(v / c for c, v, _ in self.observations), *_weighted_line(self.observations, w))
        largest, a_latest, b_latest = self._latest
        if vectors / calls <= largest + 1e-9:
            return fitted
        return max(fitted, a_latest * calls + b_latest * vectors)

    def state_dict(self) -> dict[str, Any]:
        return {"observations": [list(o) for o in self.observations]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.observations = [tuple(o) for o in state.get("observations", [])]  # type: ignore[misc]
        self._fit = self._latest = None
