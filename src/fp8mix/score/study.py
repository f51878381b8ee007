"""The sensitivity study: the same model scored under several AutoQuant configs, how stable the block ranking is,
which blocks are sensitive in every config, per-kind patterns, and a control that checks the AutoQuant choice
against random and positional block choices on held-out data."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr
from torch import nn

from ..errors import FP8MixError
from ..evaluate.metrics import counted_positions, placeholder_ids
from ..models import GROUP_KINDS, ModelLayout
from ..progress import Progress, no_progress
from ..quant.weights import QuantizedWeights
from . import kl
from .settings import AutoQuantSettings

N_RANDOM = 20
CONTROL_FRACTIONS = (0.25, 0.5)


def study_configs(base: AutoQuantSettings) -> list[tuple[str, AutoQuantSettings]]:
    """3 seeds, 2 sample counts, images vs text only, gradient vs KL (each varying one thing from the base; a
    text-only base is compared with images, labelled so)."""
    half = max(1, base.calib_samples // 2)
    return [
        ("base", base),
        (f"seed{base.seed + 1}", base.model_copy(update={"seed": base.seed + 1})),
        (f"seed{base.seed + 2}", base.model_copy(update={"seed": base.seed + 2})),
        (f"samples{half}", base.model_copy(update={"calib_samples": half})),
        ("text_only", base.model_copy(update={"with_images": False})) if base.with_images
        else ("with_images", base.model_copy(update={"with_images": True})),
        ("kl_div" if base.method == "gradient" else "gradient",
         base.model_copy(update={"method": "kl_div" if base.method == "gradient" else "gradient"})),
    ]


def check_blocks(n_blocks: int) -> None:
    """The study compares block rankings: with fewer than two blocks every rank correlation is undefined (NaN) and
    every control choice is the same block."""
    if n_blocks < 2:
        raise FP8MixError(f"the sensitivity study compares rankings of LM blocks and this model has {n_blocks} LM "
                          "block: nothing to rank; leave the study out (fp8mix run --no-study)")


def _block_vector(doc: dict) -> list[float]:
    return [b["score"] for b in sorted(doc["blocks"], key=lambda b: b["block"])]


def rank_stability(docs: dict[str, dict]) -> dict:
    labels = list(docs)
    vecs = {k: _block_vector(d) for k, d in docs.items()}
    check_blocks(min(len(v) for v in vecs.values()))
    gvecs = {k: [g["score"] for g in d["groups"]] for k, d in docs.items()}
    sp = [[float(spearmanr(vecs[a], vecs[b])[0]) for b in labels] for a in labels]
    kt = [[float(kendalltau(vecs[a], vecs[b])[0]) for b in labels] for a in labels]
    gsp = [[float(spearmanr(gvecs[a], gvecs[b])[0]) for b in labels] for a in labels]
    return {"labels": labels, "spearman_blocks": sp, "kendall_blocks": kt, "spearman_groups": gsp}


def consistently_sensitive(docs: dict[str, dict]) -> list[int]:
    """Blocks in the most sensitive quartile of every config."""
    n = len(next(iter(docs.values()))["blocks"])
    q = max(1, math.ceil(n / 4))
    sets = [{b["block"] for b in d["blocks"] if b["rank"] >= n - q} for d in docs.values()]
    return sorted(set.intersection(*sets))


def kind_patterns(doc: dict, n_blocks: int) -> dict:
    """Share of the total score per group kind, and per third of the network (early / middle / late)."""
    total = sum(g["score"] for g in doc["groups"]) or 1.0
    kinds = {k: sum(g["score"] for g in doc["groups"] if g["kind"] == k) / total for k in GROUP_KINDS}
    per_param = {k: float(np.mean([g["score"] / g["params"] for g in doc["groups"] if g["kind"] == k]))
                 for k in GROUP_KINDS}
    thirds = np.array_split(np.arange(n_blocks), 3)
    blocks = _block_vector(doc)
    parts = {name: sum(blocks[i] for i in idx) / total for name, idx in zip(("early", "middle", "late"), thirds)}
    return {"kind_share": kinds, "kind_score_per_param": per_param, "depth_share": parts,
            "depth_blocks": {name: [int(i) for i in idx] for name, idx in zip(("early", "middle", "late"), thirds)}}


@torch.no_grad()
def control(model, layout: ModelLayout, doc: dict, batches: list[dict], fmt, seed: int = 0,
            progress: Progress = no_progress, layers: nn.ModuleList | None = None,
            vision: nn.Module | None = None, calib_batches: list[dict] | None = None) -> dict:
    """Held-out KL(BF16 ‖ FP8 choice) per text position (as eval counts them) of the AutoQuant block choice at each
    control coverage, against N_RANDOM random choices of as many blocks, the first-K and the last-K blocks.

    Computed as the KL score computes it (kl.py): per batch one recorded BF16 forward and the reference's
    log-probabilities, then the distinct choices STACK at a time in one stacked forward each; with `layers` and
    `vision` given, the vision tower and the blocks before a stack's first FP8 block are replayed. A choice drawn
    twice (or equal to another choice) is computed once, so equal choices get equal figures. fp8_static: the input
    scales calibrated on `calib_batches` (the calibration set, as export calibrates the checkpoints'), else on
    `batches`."""
    from ..plan.planner import blocks_for_fraction

    qw = QuantizedWeights(model, [g.modules for g in layout.groups], fmt)
    qw.calibrate(model, calib_batches or batches)  # no reduce across ranks: the control runs in the main process
    placeholders = placeholder_ids(model.config)
    # KL over the positions that predict text, as eval counts them (not padding, not image placeholders)
    if not any(bool(counted_positions(b, placeholders)[0].any()) for b in batches):
        raise FP8MixError("the control samples have no text position to measure KL on; check --data")

    rng = random.Random(f"fp8mix-control:{seed}")
    n = layout.n_blocks
    choices = {}
    for frac in CONTROL_FRACTIONS:
        k = blocks_for_fraction(frac, n)
        choices[frac] = {"k": k, "auto": frozenset(b["block"] for b in doc["blocks"] if b["rank"] < k),
                         "random": [frozenset(rng.sample(range(n), k)) for _ in range(N_RANDOM)],
                         "first_k": frozenset(range(k)), "last_k": frozenset(range(n - k, n))}
    distinct = sorted({c for ch in choices.values() for c in (ch["auto"], ch["first_k"], ch["last_k"], *ch["random"])},
                      key=lambda c: (min(c, default=n), sorted(c)))
    stacks = [distinct[i:i + kl.STACK] for i in range(0, len(distinct), kl.STACK)]
    modules = {c: [m for g in layout.groups if g.block in c for m in g.modules] for c in distinct}
    head = model.get_output_embeddings()
    tot, count = dict.fromkeys(distinct, 0.0), 0
    for b in progress(batches, f"control ({len(distinct)} block choices, {len(stacks)} forwards a batch)"):
        bf16 = kl.Recorded(model, b, placeholders, layers, vision)
        ref = kl.log_probs(head, bf16.hidden)
        count += bf16.n_text
        for stack in stacks:
            first = min(min(c, default=n) for c in stack)
            for c, h in zip(stack, bf16.variants(qw, [modules[c] for c in stack], first)):
                tot[c] += float(kl.kl_sum(head, h, ref))
        del bf16, ref
    kl_of = {c: v / count for c, v in tot.items()}
    bad = [sorted(c) for c, v in kl_of.items() if not math.isfinite(v)]
    if bad:
        raise FP8MixError(f"the control's KL is not finite for {len(bad)} of {len(kl_of)} block choices (first: blocks "
                          f"{bad[0]}): a forward on the held-out data overflowed or gave NaN; check the model's "
                          "weights and --data")

    out = {}
    for frac, ch in choices.items():
        rand = [kl_of[c] for c in ch["random"]]
        a = kl_of[ch["auto"]]
        out[f"{frac:.2f}"] = {"blocks": ch["k"], "autoquant": a, "autoquant_blocks": sorted(ch["auto"]),
                              "random": rand, "random_mean": float(np.mean(rand)),
                              "autoquant_beats_random": int(sum(a < r for r in rand)),
                              "first_k": kl_of[ch["first_k"]], "last_k": kl_of[ch["last_k"]]}
    return out
