"""AutoQuant sensitivity: how much each LM linear hurts the loss when it alone runs in FP8.

Gradient method (ModelOpt's auto_quantize score): for module m with BF16 output Y and FP8 output Y_q,
    score(m) = Σ over calibration batches and output elements of (∂L/∂Y ⊙ (Y_q − Y))²,
a second-order Taylor estimate of the loss increase with the empirical Fisher in place of the Hessian. L is the
model's next-token loss on the batch (transformers' mean cross-entropy over the labelled tokens: the assistant
replies). Each module is perturbed alone, the rest of the network in BF16 — yet one forward/backward serves every
module: the forward hook computes ΔY = Y_q − Y beside the normal output (the network keeps running on Y), and a
gradient hook on Y multiplies it with ∂L/∂Y. Only activations get gradients; weights are frozen. Y_q is the
output of the layer as the checkpoint serves it (quant.weights.QuantizedWeights): for fp8_static with the one
weight and input scale of its fused group, so a member with a smaller range than its neighbours is scored with
the coarser grid it gets in vLLM.

KL method: for each group, the model with only that group in FP8; score = Σ over the text positions of
KL(p_BF16 ‖ p_group-FP8) of the next-token distribution (the forwards are kl.py's: what cannot change replayed,
a block's groups run stacked). Text positions are the ones eval and the study's control
average over (evaluate.metrics.counted_positions): position t counts when token t+1 is a real token and not an
image placeholder or vision marker. Positions that predict a placeholder say nothing about the text a served model
writes, and with photos at realistic size they would be most of the sum.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from ..evaluate.metrics import placeholder_ids
from ..models import LinearGroup
from ..progress import Progress, no_progress
from ..quant.numerics import FP8Format
from ..quant.weights import QuantizedWeights
from .. import distributed
from . import kl

# fp8_static input scales are the max over every rank's calibration tokens
_max_across_ranks = partial(distributed.all_reduce, op="max")


@contextmanager
def frozen_weights_with_input_grads(model: nn.Module):
    """Weights get no gradients (they are not needed and would cost memory); the token embeddings' output
    requires grad so that ∂L/∂Y reaches every LM linear."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()
        for p, flag in saved:
            p.requires_grad_(flag)


def gradient_scores(model: nn.Module, groups: list[LinearGroup], batches: list[dict], fmt: FP8Format,
                    progress: Progress = no_progress, cache_weights: bool = True) -> dict[str, float]:
    """Per-module gradient scores (sum over all batches; under torchrun, over every rank's batches)."""
    names = [m for g in groups for m in g.modules]
    qw = QuantizedWeights(model, [g.modules for g in groups], fmt, cache_weights)
    qw.calibrate(model, batches, progress, _max_across_ranks)
    # each sum lives beside its module (a device map spreads modules over GPUs)
    acc = {n: torch.zeros((), dtype=torch.float64, device=qw.modules[n].weight.device) for n in names}

    def hook(name):
        def fn(_mod, args, out):
            if not out.requires_grad:
                return
            with torch.no_grad():
                delta = qw.output(name, args[0]) - out

            def on_grad(g):
                acc[name].add_((g.float() * delta.float()).square().sum())

            out.register_hook(on_grad)
        return fn

    handles = [qw.modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with frozen_weights_with_input_grads(model):
            for batch in progress(batches, "scoring (gradient)"):
                loss = model(**batch, use_cache=False).loss
                loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {n: float(v) for n, v in zip(names, distributed.all_reduce([acc[n] for n in names]))}


@torch.no_grad()
def kl_scores(model: nn.Module, groups: list[LinearGroup], batches: list[dict], fmt: FP8Format,
              progress: Progress = no_progress, cache_weights: bool = True, layers: nn.ModuleList | None = None,
              vision: nn.Module | None = None) -> dict[str, float]:
    """Per-group KL scores, reported on the group's first module (the group is the unit of the KL method).

    Per batch: one BF16 forward (kl.Recorded), the reference's log-probabilities at the text positions taken once,
    then one forward per block that runs the block's groups as variants stacked along the batch dimension (group
    j in FP8 in slice j). With `layers` (the decoder blocks) and `vision` (the vision tower) given, a forward does
    not recompute what FP8 in block k cannot change: the vision tower and blocks 0..k-1 return their outputs
    recorded in the BF16 pass, so only blocks k.. and the head run again. The sum of a group does not depend on
    how the samples are batched (each position's KL depends on its own sample only), so callers may batch by
    length to cut padding. Equal to full forwards per group (tests/score/kl_reference.py, tested)."""
    qw = QuantizedWeights(model, [g.modules for g in groups], fmt, cache_weights)
    qw.calibrate(model, batches, progress, _max_across_ranks)
    head, placeholders = model.get_output_embeddings(), placeholder_ids(model.config)
    sums = torch.zeros(len(groups), dtype=torch.float64, device=head.weight.device)
    by_block: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_block.setdefault(g.block, []).append(i)
    stacks = [idx[k:k + kl.STACK] for idx in by_block.values() for k in range(0, len(idx), kl.STACK)]
    for batch in progress(batches, "scoring (KL, one forward per block)"):
        bf16 = kl.Recorded(model, batch, placeholders, layers, vision)
        ref = kl.log_probs(head, bf16.hidden)
        for idx in stacks:
            hidden = bf16.variants(qw, [groups[i].modules for i in idx], groups[idx[0]].block)
            for i, h in zip(idx, hidden):
                sums[i] += kl.kl_sum(head, h, ref)
        del bf16, ref
    summed = distributed.all_reduce([s for s in sums.cpu()])
    return {m: (float(summed[i]) if m == g.modules[0] else 0.0) for i, g in enumerate(groups) for m in g.modules}


__all__ = ["frozen_weights_with_input_grads", "gradient_scores", "kl_scores"]
