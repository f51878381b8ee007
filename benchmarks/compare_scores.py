#!/usr/bin/env python3
"""Compare the scores files of several run directories (same settings): Spearman rho and the largest relative
difference of the group scores against the first run. Usage: compare_scores.py RUN [RUN ...]"""

import json
import sys
from pathlib import Path

from scipy.stats import spearmanr


def groups(run: str) -> dict[str, float]:
    files = sorted(Path(run, "scores").glob("*.json"))
    if len(files) != 1:
        raise SystemExit(f"{run}: expected one scores file, found {len(files)}")
    return {g["name"]: g["score"] for g in json.loads(files[0].read_text())["groups"]}


if __name__ == "__main__":
    base = groups(sys.argv[1])
    names = sorted(base)
    for run in sys.argv[2:]:
        other = groups(run)
        rho = spearmanr([base[n] for n in names], [other[n] for n in names]).statistic
        rel = max(abs(other[n] - base[n]) / abs(base[n]) for n in names)
        print(f"{run} vs {sys.argv[1]}: Spearman rho {rho:.4f}, max relative difference {rel:.2e}")
