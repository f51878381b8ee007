"""Exact effective-bits budget: choose the FP8 items (groups or blocks) that minimise the summed sensitivity
while enough weight parameters go FP8 to meet the bit budget. A 0/1 knapsack, solved exactly with scipy's
MILP (HiGHS)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import FP8MixError


def fp8_fraction_for_bits(bits: float) -> float:
    """FP8 = 8 bits, BF16 = 16: effective bits = 16 - 8 * (FP8 share of the LM linear weights)."""
    return (16.0 - bits) / 8.0


def solve_budget(scores: list[float], params: list[int], bits: float) -> list[bool]:
    """Which items go FP8. Scores are normalised to [0, 1] first: raw scores span orders of magnitude, which
    hurts the solver's tolerances."""
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(params, dtype=np.float64)
    need = fp8_fraction_for_bits(bits)
    if need <= 0:
        return [False] * len(s)
    s = s / s.max() if s.max() > 0 else s
    share = p / p.sum()
    # a tiny tie-breaker on the item index keeps equal-score choices deterministic (earlier items first)
    tie = np.arange(len(s)) * 1e-9
    res = milp(c=s + tie, integrality=np.ones(len(s)), bounds=Bounds(0, 1),
               constraints=LinearConstraint(share[None, :], lb=need - 1e-12, ub=np.inf), options={"disp": False})
    if not res.success:
        raise FP8MixError(f"no FP8 choice reaches {bits} effective bits ({res.message})")
    return [bool(round(v)) for v in res.x]
