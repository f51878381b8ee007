"""The report's figures (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


DPI = 120


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata={"Software": None})  # no version stamp: identical inputs, identical bytes
    plt.close(fig)
    return path


def group_kinds(sens: dict) -> list[str]:
    """The fused-group kinds of the scored model, in the order its groups list them (the report reads run files
    only, never the model family's code)."""
    return list(dict.fromkeys(g["kind"] for g in sens["groups"]))


def heatmap(sens: dict, path: Path) -> Path:
    n = sens["n_blocks"]
    kinds = group_kinds(sens)
    grid = np.zeros((len(kinds), n))
    for g in sens["groups"]:
        grid[kinds.index(g["kind"]), g["block"]] = g["score"]
    floor = grid[grid > 0].min() if (grid > 0).any() else 1e-30
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * n + 2), 2.8))
    im = ax.imshow(np.log10(np.maximum(grid, floor)), aspect="auto", cmap="magma_r")
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=7 if n > 20 else 9)
    ax.set_xlabel("LM block")
    ax.set_title(f"AutoQuant sensitivity, log10 (group score), {sens['method']}")
    fig.colorbar(im, ax=ax, label="log10 score")
    return _save(fig, path)


def block_bars(sens: dict, plans: dict[str, dict], path: Path) -> Path:
    blocks = sorted(sens["blocks"], key=lambda b: b["block"])
    x = np.arange(len(blocks))
    scores = np.array([b["score"] for b in blocks])
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(blocks) + 2), 3.4))
    ax.bar(x, scores, color="#9aa5b1", label="BF16 in every fraction scheme")
    fractions = [(n, p) for n, p in plans.items() if "blocks_fraction" in p["rule"] and p["rule"]["blocks_fraction"] < 1]
    colors = ["#1b9e77", "#7570b3", "#d95f02", "#e7298a"]
    ordered = sorted(fractions, key=lambda t: -t[1]["rule"]["blocks_fraction"])
    for i, (name, p) in enumerate(ordered):
        chosen = p["fp8_blocks"]
        label = f"FP8 in {name}" + (" (and larger fractions)" if i > 0 else "")
        ax.bar(x[chosen], scores[chosen], color=colors[i % len(colors)], label=label)
    ax.set_yscale("log")
    ax.set_xticks(x, [str(b["block"]) for b in blocks], fontsize=7 if len(blocks) > 20 else 9)
    ax.set_xlabel("LM block")
    ax.set_ylabel("block score (sum of groups)")
    ax.set_title("Per-block sensitivity and the blocks each scheme puts in FP8")
    ax.legend(fontsize=8)
    return _save(fig, path)


def stability(study: dict, path: Path) -> Path:
    st = study["stability"]
    labels = st["labels"]
    m = np.array(st["spearman_blocks"])
    fig, ax = plt.subplots(figsize=(1.0 * len(labels) + 2, 0.9 * len(labels) + 1.2))
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu")
    ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(m[i, j]) > 0.6 else "black")
    ax.set_title("Rank stability of block scores (Spearman)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def pareto(rows: list[dict], study: dict | None, positions: str, path: Path) -> Path:
    """Each scheme's mean KL (over `positions`, as eval.json counts them) against its effective bits, with the
    study's control choices (the control's own KL) where the study ran."""
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    schemes = [r for r in rows if r["scheme"] != "bf16"]
    for r in schemes:
        kl = r["kl_mean"] if r.get("kl_mean") is not None else r.get("kl_topk_mean")
        if kl is None:  # a scheme vLLM did not serve, in an eval of vLLM only
            continue
        kl = max(kl, 1e-9)
        ax.scatter(r["effective_bits"], kl, color="#d95f02", zorder=3)
        ax.annotate(r["scheme"].replace("fp8_autoquant_", ""), (r["effective_bits"], kl),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    if study and "control" in study:
        for frac, c in study["control"].items():
            bits = 16 - 8 * float(frac)
            ax.scatter([bits] * len(c["random"]), c["random"], color="#9aa5b1", s=12, alpha=0.7,
                       label="random blocks (control)" if frac == "0.25" else None, zorder=2)
            ax.scatter(bits, c["first_k"], marker="^", color="#7570b3", label="first-K blocks" if frac == "0.25" else None)
            ax.scatter(bits, c["last_k"], marker="v", color="#1b9e77", label="last-K blocks" if frac == "0.25" else None)
            ax.scatter(bits, c["autoquant"], marker="*", s=90, color="#e7298a",
                       label="AutoQuant choice (control set)" if frac == "0.25" else None, zorder=4)
    ax.set_yscale("log")
    ax.set_xlabel("effective bits of the LM linear weights (lower = smaller)")
    ax.set_ylabel(f"mean KL(BF16 || scheme), nats\nschemes: over {positions}", fontsize=9)
    ax.invert_xaxis()
    if study and "control" in study:
        ax.set_title("Quality vs size: schemes and controls")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.set_title("Quality vs size (no study: no controls)")
    return _save(fig, path)


def served_vs_emulated(pairs: dict[str, tuple[dict, dict]], path: Path) -> Path:
    """Per scheme, its quality as vLLM serves it against its quality as fp8mix emulates it: reply top-k KL and
    reply top-1 agreement (`pairs`: scheme -> (emulated row, served row)). On the diagonal they agree."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    panels = (("kl_topk_reply_mean", "reply top-k KL vs BF16, nats", True),
              ("top1_reply_agreement", "reply top-1 agreement with BF16", False))
    for ax, (key, label, log) in zip(axes, panels):
        xs = [max(e[key], 1e-9) if log else e[key] for e, _ in pairs.values()]
        ys = [max(s[key], 1e-9) if log else s[key] for _, s in pairs.values()]
        ax.scatter(xs, ys, color="#d95f02", zorder=3)
        for name, x, y in zip(pairs, xs, ys):
            ax.annotate(name.replace("fp8_autoquant_", ""), (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        lo, hi = (min(xs + ys), max(xs + ys)) if xs else (0, 1)
        pad = (hi / lo) ** 0.1 if log and lo > 0 else (hi - lo) * 0.1 + 1e-3
        lo, hi = (lo / pad, hi * pad) if log and lo > 0 else (lo - pad, hi + pad)
        ax.plot([lo, hi], [lo, hi], color="#9aa5b1", lw=1, zorder=1)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(f"emulated (transformers): {label}", fontsize=9)
        ax.set_ylabel(f"served (vLLM): {label}", fontsize=9)
    fig.suptitle("Served vs emulated quality, per scheme (diagonal: equal)")
    return _save(fig, path)


def speed_vs_quality(points: dict[str, tuple[float, float]], workload: str, quality_label: str, path: Path) -> Path:
    """Each scheme's served speed-up over BF16 against its quality figure (`points`: scheme -> (x, y))."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (x, y) in points.items():
        ax.scatter(x, max(y, 1e-9), color="#1b9e77", zorder=3)
        ax.annotate(name.replace("fp8_autoquant_", ""), (x, max(y, 1e-9)), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.axvline(1.0, color="#9aa5b1", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel(f"served speed-up over BF16, {workload} workload (vLLM, median)")
    ax.set_ylabel(quality_label, fontsize=9)
    ax.set_title("Speed vs quality")
    return _save(fig, path)
