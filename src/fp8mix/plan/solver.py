"""Exact effective-bits budget: choose the FP8 items (groups or blocks) that minimise the summed sensitivity
while enough weight parameters go FP8 to meet the bit budget. A 0/1 knapsack.

The budget is a whole number of parameters (the fewest FP8 parameters whose effective bits, computed as the plan
computes them, do not exceed the target), so no tolerance lets a plan end a few parameters short of it.

Items of equal size are interchangeable for the budget, so an optimal choice takes the least sensitive items of
each size (ties: the earlier item). A model's groups come in a few sizes (one per kind; blocks are all one size),
so the solver enumerates how many items of each size go FP8: exact whatever the scores' range, which a
floating-point MILP is not (its tolerances ignore score differences below about 1e-7 of the largest score, and
gradient scores span many orders of magnitude). Items of too many different sizes for that go to scipy's MILP
(HiGHS), with zero gap tolerances."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import FP8MixError

# count vectors the exact enumeration may try (each a handful of numpy operations' share)
MAX_COMBINATIONS = 4_000_000


def fp8_params_needed(total: int, bits: float) -> int:
    """The fewest FP8 parameters out of ``total`` for which 16 - 8 * fp8 / total <= bits, both exactly and as the
    plan computes it in floating point."""
    need = max(0, math.ceil((16 - Fraction(bits)) / 8 * total))
    while need < total and 16.0 - 8.0 * need / total > bits:
        need += 1
    return need


def solve_budget(scores: list[float], params: list[int], bits: float) -> list[bool]:
    """Which items go FP8."""
    s = np.asarray(scores, dtype=np.float64)
    p = [int(x) for x in params]
    need = fp8_params_needed(sum(p), bits)
    if need <= 0:
        return [False] * len(s)
    if need > sum(p):
        raise FP8MixError(f"no FP8 choice reaches {bits} effective bits (all FP8 is 8)")
    by_size: dict[int, list[int]] = {}
    for i in sorted(range(len(s)), key=lambda i: (s[i], i)):
        by_size.setdefault(p[i], []).append(i)
    sizes = sorted(by_size, key=lambda size: len(by_size[size]))
    if math.prod(len(by_size[size]) + 1 for size in sizes[:-1]) <= MAX_COMBINATIONS:
        return _enumerate(s, by_size, sizes, need)
    return _milp(s, p, need, bits)


def _enumerate(s: np.ndarray, by_size: dict[int, list[int]], sizes: list[int], need: int) -> list[bool]:
    """Every count of the items of each size but the last (the most numerous); of the last, the best count that
    meets the budget. Takes the first of equal totals (fewest items of the earlier sizes)."""
    # prefix[k]: the summed score of a size's k least sensitive items
    prefix = {size: np.concatenate([[0.0], np.cumsum(s[by_size[size]])]) for size in sizes}
    *rest, last = sizes
    grids = np.meshgrid(*[np.arange(len(by_size[size]) + 1) for size in rest], indexing="ij")
    counts = [g.ravel() for g in grids] if rest else []
    n = counts[0].size if counts else 1
    taken = np.zeros(n, dtype=np.int64)
    total = np.zeros(n, dtype=np.float64)
    for size, k in zip(rest, counts):
        taken += k * size
        total += prefix[size][k]
    n_last = len(by_size[last])
    k_min = -(-np.maximum(need - taken, 0) // last)  # ceil
    ok = k_min <= n_last
    # best count of the last size from k_min on (more than needed only pays with a negative score)
    pl = prefix[last]
    best_k = np.arange(n_last + 1)
    for k in range(n_last - 1, -1, -1):
        if pl[best_k[k + 1]] < pl[k]:
            best_k[k] = best_k[k + 1]
    k_last = best_k[np.minimum(k_min, n_last)]
    total = np.where(ok, total + pl[k_last], np.inf)
    pick = int(np.argmin(total))
    chosen = [i for size, k in zip(rest, counts) for i in by_size[size][:k[pick]]]
    chosen += by_size[last][:k_last[pick]]
    out = [False] * len(s)
    for i in chosen:
        out[i] = True
    return out


def _milp(s: np.ndarray, p: list[int], need: int, bits: float) -> list[bool]:
    """HiGHS on the 0/1 knapsack; scores normalised to [0, 1] (raw scores hurt its tolerances)."""
    c = s / np.abs(s).max() if np.abs(s).max() > 0 else s
    with warnings.catch_warnings():  # scipy warns that it passes mip_abs_gap to HiGHS verbatim
        warnings.simplefilter("ignore", RuntimeWarning)
        res = milp(c=c, integrality=np.ones(len(s)), bounds=Bounds(0, 1),
                   constraints=LinearConstraint(np.asarray(p, dtype=np.float64)[None, :], lb=need, ub=np.inf),
                   options={"disp": False, "mip_rel_gap": 0.0, "mip_abs_gap": 0.0})
    if not res.success:
        raise FP8MixError(f"no FP8 choice reaches {bits} effective bits ({res.message})")
    return [bool(round(v)) for v in res.x]
