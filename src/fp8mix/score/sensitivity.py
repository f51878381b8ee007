"""sensitivity.json: per-group and per-block AutoQuant scores, with the settings that produced them."""

from __future__ import annotations

import math
import time

import torch

from .. import distributed
from ..errors import FP8MixError
from ..models import ModelLayout
from ..models.loading import LoadedModel
from ..progress import Progress, no_progress
from ..quant.numerics import FP8Format
from .autoquant import gradient_scores, kl_scores
from .batches import calibration_batches
from .settings import AutoQuantSettings

GRANULARITY = "group"
# what a score sums, per method
LOSS = {"gradient": "mean next-token cross-entropy over the assistant reply tokens of each batch",
        "kl_div": "sum of KL(p_BF16 || p_FP8) of the next-token distribution over the text positions (as eval "
                  "counts them: the next token is a real token, not an image placeholder or vision marker)"}


def build_document(model_id: str, fingerprint: str, layout: ModelLayout, settings: AutoQuantSettings,
                   module_scores: dict[str, float], n_samples: int, n_tokens: int, plan_facts: dict) -> dict:
    groups = []
    for g in layout.groups:
        score = sum(module_scores[m] for m in g.modules)
        groups.append({"name": g.name, "block": g.block, "kind": g.kind, "modules": list(g.modules),
                       "params": g.params, "score": score,
                       "module_scores": {m: module_scores[m] for m in g.modules}})
    block_scores = {b: sum(x["score"] for x in groups if x["block"] == b) for b in range(layout.n_blocks)}
    # rank 0 = least sensitive; ties broken by block index
    order = sorted(block_scores, key=lambda b: (block_scores[b], b))
    blocks = [{"block": b, "score": block_scores[b], "rank": order.index(b)} for b in range(layout.n_blocks)]
    return {
        "model": model_id,
        "model_fingerprint": fingerprint,
        "granularity": GRANULARITY,
        "method": settings.method,
        "settings_key": settings.key(fingerprint),
        "calibration": {"source": settings.data, "n_samples": n_samples, "n_tokens": n_tokens,
                        "with_images": settings.with_images, "seed": settings.seed,
                        "batch_size": settings.batch_size, "max_length": settings.max_length,
                        "loss": LOSS[settings.method]},
        "fp8_format": settings.fp8_format.value,
        "n_blocks": layout.n_blocks,
        "model_layout": plan_facts,
        "groups": groups,
        "blocks": blocks,
    }


def score(loaded: LoadedModel, settings: AutoQuantSettings, progress: Progress = no_progress,
          device: str | torch.device | None = None, low_memory: bool = False, timings: dict | None = None) -> dict:
    """Run one scoring pass and return the sensitivity document (not yet written). `low_memory` quantizes each
    weight when used instead of keeping FP8 copies (same scores). `timings`, when given, gets the seconds spent
    building the batches (`batches_s`) and in the scoring pass (`pass_s`)."""
    t0 = time.perf_counter()
    torch.manual_seed(settings.seed)
    # the input embeddings' device: under a device map, accelerate's hooks move inputs on from there
    device = device or loaded.model.get_input_embeddings().weight.device
    # a KL sum does not depend on how the samples are batched, so its batches go by length (about a third fewer
    # padded tokens on the default real data); fp8_static's input scales do (their maximum counts padding, as
    # export calibrates them), so they keep the order
    by_length = settings.method == "kl_div" and settings.fp8_format is not FP8Format.fp8_static
    batches, n_samples, dropped = calibration_batches(loaded.processor, settings, device, shard=True,
                                                      by_length=by_length)
    groups = list(loaded.layout.groups)
    t1 = time.perf_counter()
    if settings.method == "gradient":
        module_scores = gradient_scores(loaded.model, groups, batches, settings.fp8_format, progress,
                                        cache_weights=not low_memory)
    else:
        adapter, model = loaded.adapter, loaded.model
        module_scores = kl_scores(model, groups, batches, settings.fp8_format, progress, cache_weights=not low_memory,
                                  layers=model.get_submodule(adapter.blocks_path),
                                  vision=model.get_submodule(adapter.vision_path) if adapter.vision_path else None)
    check_scores(module_scores)
    if timings is not None:
        timings.update(batches_s=round(t1 - t0, 2), pass_s=round(time.perf_counter() - t1, 2))
    counts = [torch.tensor(sum(int(b["attention_mask"].sum()) for b in batches), dtype=torch.float64),
              torch.tensor(sum(int((b["labels"] != -100).sum()) for b in batches), dtype=torch.float64)]
    n_tokens, n_supervised = (int(x) for x in distributed.all_reduce(counts))
    doc = build_document(loaded.model_id, loaded.fingerprint, loaded.layout, settings, module_scores,
                         n_samples, n_tokens, loaded.adapter.plan_facts(loaded.model))
    doc["calibration"].update(n_supervised_tokens=n_supervised, n_dropped_too_long=dropped,
                              max_pixels=settings.max_pixels)
    return doc


def check_scores(module_scores: dict[str, float]) -> None:
    """Scores that cannot rank anything stop the run: NaN/inf (a non-finite loss or FP8 overflow) or all zero (no
    token reached the loss)."""
    bad = [n for n, v in module_scores.items() if not math.isfinite(v)]
    if bad:
        raise FP8MixError(f"{len(bad)} of {len(module_scores)} module scores are not finite (first: {bad[0]}); the "
                          "loss or an FP8 output overflowed: check the model's weights and the calibration data")
    if module_scores and all(v == 0.0 for v in module_scores.values()):
        raise FP8MixError(f"all {len(module_scores)} module scores are zero: no calibration token changed the loss; "
                          "check that the calibration samples have assistant replies")
