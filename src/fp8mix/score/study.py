"""The sensitivity study: the same model scored under several AutoQuant configs, how stable the block ranking is,
which blocks are sensitive in every config, per-kind patterns, and a control that checks the AutoQuant choice
against random and positional block choices on held-out data."""

from __future__ import annotations

import math
import random
from contextlib import ExitStack

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

from ..data.samples import model_inputs
from ..errors import FP8MixError
from ..evaluate.metrics import counted_positions, placeholder_ids
from ..models import GROUP_KINDS, ModelLayout
from ..quant.weights import QuantizedWeights
from .autoquant import _fp8_group, _kl_sum, _logits, _text_hidden
from .settings import AutoQuantSettings

N_RANDOM = 20
CONTROL_FRACTIONS = (0.25, 0.5)


def study_configs(base: AutoQuantSettings) -> list[tuple[str, AutoQuantSettings]]:
    """3 seeds, 2 sample counts, images vs text only, gradient vs KL (each varying one thing from the base)."""
    half = max(1, base.calib_samples // 2)
    return [
        ("base", base),
        (f"seed{base.seed + 1}", base.model_copy(update={"seed": base.seed + 1})),
        (f"seed{base.seed + 2}", base.model_copy(update={"seed": base.seed + 2})),
        (f"samples{half}", base.model_copy(update={"calib_samples": half})),
        ("text_only", base.model_copy(update={"with_images": not base.with_images})
         if base.with_images else base.model_copy(update={"with_images": True})),
        ("kl_div" if base.method == "gradient" else "gradient",
         base.model_copy(update={"method": "kl_div" if base.method == "gradient" else "gradient"})),
    ]


def _block_vector(doc: dict) -> list[float]:
    return [b["score"] for b in sorted(doc["blocks"], key=lambda b: b["block"])]


def rank_stability(docs: dict[str, dict]) -> dict:
    labels = list(docs)
    vecs = {k: _block_vector(d) for k, d in docs.items()}
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
def control(model, layout: ModelLayout, doc: dict, batches: list[dict], fmt, seed: int = 0) -> dict:
    """Held-out KL(BF16 ‖ FP8 choice) per text position (as eval counts them) of the AutoQuant block choice at each
    control coverage, against N_RANDOM random choices of as many blocks, the first-K and the last-K blocks."""
    from ..plan.planner import blocks_for_fraction

    qw = QuantizedWeights(model, [g.modules for g in layout.groups], fmt)
    qw.calibrate(model, batches)  # no reduce across ranks: the control runs in the main process alone
    placeholders = placeholder_ids(model.config)
    # KL over the positions that predict text, as eval counts them (not padding, not image placeholders)
    masks = [counted_positions(b, placeholders)[0] for b in batches]
    if not any(bool(m.any()) for m in masks):
        raise FP8MixError("the control samples have no text position to measure KL on; check --data")

    # as the KL score computes it: the lm_head only at the text positions, the references as logits in the
    # model's dtype (not the whole set's float32 log-probabilities)
    head = model.get_output_embeddings()
    hidden = [_text_hidden(model, model_inputs(b), m) for b, m in zip(batches, masks)]
    refs = [_logits(head, h) for h in hidden]
    del hidden

    def kl_of(blocks: set[int]) -> float:
        tot, n = 0.0, 0
        with ExitStack() as stack:
            for g in layout.groups:
                if g.block in blocks:
                    stack.enter_context(_fp8_group(qw, g))
            for b, m, ref in zip(batches, masks, refs):
                tot += float(_kl_sum(head, _text_hidden(model, model_inputs(b), m), ref))
                n += int(ref.shape[0])
        return tot / n

    rng = random.Random(f"fp8mix-control:{seed}")
    n = layout.n_blocks
    out = {}
    for frac in CONTROL_FRACTIONS:
        k = blocks_for_fraction(frac, n)
        auto = {b["block"] for b in doc["blocks"] if b["rank"] < k}
        rand = [kl_of(set(rng.sample(range(n), k))) for _ in range(N_RANDOM)]
        a = kl_of(auto)
        out[f"{frac:.2f}"] = {"blocks": k, "autoquant": a, "autoquant_blocks": sorted(auto),
                              "random": rand, "random_mean": float(np.mean(rand)),
                              "autoquant_beats_random": int(sum(a < r for r in rand)),
                              "first_k": kl_of(set(range(k))), "last_k": kl_of(set(range(n - k, n)))}
    return out

