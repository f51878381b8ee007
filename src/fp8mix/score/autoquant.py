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

KL method: for each group, one extra forward with only that group in FP8; score = Σ over the text positions of
KL(p_BF16 ‖ p_group-FP8) of the next-token distribution. Text positions are the ones eval and the study's control
average over (evaluate.metrics.counted_positions): position t counts when token t+1 is a real token and not an
image placeholder or vision marker. Positions that predict a placeholder say nothing about the text a served model
writes, and with photos at realistic size they would be most of the sum.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..data.samples import model_inputs
from ..evaluate.metrics import counted_positions, placeholder_ids
from ..models import LinearGroup
from ..progress import Progress, no_progress
from ..quant.numerics import FP8Format
from ..quant.weights import QuantizedWeights
from .. import distributed

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


@contextmanager
def _fp8_group(qw: QuantizedWeights, group: LinearGroup):
    """Run the group's modules in FP8: their forward is swapped for the FP8 one (so the BF16 product is not
    computed and thrown away)."""
    mods = {n: qw.modules[n] for n in group.modules}
    for n, mod in mods.items():
        mod.forward = lambda x, n=n: qw.output(n, x)
    try:
        yield
    finally:
        for mod in mods.values():
            del mod.forward  # back to the class's forward


@contextmanager
def _replayed(outputs: dict[nn.Module, object]):
    """Modules whose forward returns the output recorded in the BF16 pass instead of computing it again. Any
    forward already set on the instance (accelerate's device-map hook) is put back afterwards."""
    saved = {mod: mod.__dict__.get("forward") for mod in outputs}
    for mod, out in outputs.items():
        # a shallow copy each call: callers may replace fields of a returned ModelOutput (Qwen2.5-VL splits the
        # vision tower's pooler_output in place)
        mod.forward = lambda *_a, _out=out, **_k: copy.copy(_out)
    try:
        yield
    finally:
        for mod, fwd in saved.items():
            if fwd is None:
                del mod.forward
            else:
                mod.forward = fwd


# Positions whose logits exist at once in the KL pass: bounds its scratch memory to SLICE x vocab floats.
SLICE = 1024


def _text_hidden(model: nn.Module, inputs: dict, text: torch.Tensor) -> torch.Tensor:
    """The final hidden states at the text positions ([n_text, hidden]): the model without its lm_head."""
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1]
    return hidden[text.to(hidden.device)]


def _logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits of `hidden` ([n, hidden]), in the model's dtype, a slice of positions at a time."""
    device = head.weight.device
    return torch.cat([head(hidden[k:k + SLICE].to(device)) for k in range(0, max(len(hidden), 1), SLICE)])


def _kl_sum(head: nn.Module, hidden: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Σ over positions of KL(p_ref ‖ p), p from `hidden` through `head`, a slice of positions at a time (float64,
    on the head's device)."""
    total = torch.zeros((), dtype=torch.float64, device=ref.device)
    for k in range(0, hidden.shape[0], SLICE):
        logq = F.log_softmax(_logits(head, hidden[k:k + SLICE]).float(), dim=-1)
        logp = F.log_softmax(ref[k:k + SLICE].float(), dim=-1)
        total += F.kl_div(logq, logp, reduction="sum", log_target=True).double()
    return total


@torch.no_grad()
def kl_scores(model: nn.Module, groups: list[LinearGroup], batches: list[dict], fmt: FP8Format,
              progress: Progress = no_progress, cache_weights: bool = True, layers: nn.ModuleList | None = None,
              vision: nn.Module | None = None) -> dict[str, float]:
    """Per-group KL scores, reported on the group's first module (the group is the unit of the KL method).

    Only the hidden states at the text positions go through the lm_head, a slice at a time; the BF16 reference
    keeps those positions' logits in the model's dtype (its log-probabilities are recomputed from them exactly),
    and the sums stay on the device until the end. With `layers` (the decoder blocks) and `vision` (the vision
    tower) given, a group's forward does not recompute what FP8 in block k cannot change: the vision tower and
    blocks 0..k-1 return their outputs recorded in the BF16 pass, so only blocks k.. and the head run again. The
    result is the same as a full forward (tested)."""
    qw = QuantizedWeights(model, [g.modules for g in groups], fmt, cache_weights)
    qw.calibrate(model, batches, progress, _max_across_ranks)
    head, placeholders = model.get_output_embeddings(), placeholder_ids(model.config)
    sums = torch.zeros(len(groups), dtype=torch.float64, device=head.weight.device)
    recorded: dict[nn.Module, object] = {}
    blocks, always = list(layers or []), [vision] if vision is not None else []
    for batch in progress(batches, "scoring (KL, one forward per group)"):
        inputs = model_inputs(batch)
        text = counted_positions(batch, placeholders)[0]
        handles = [m.register_forward_hook(lambda mod, _a, o: recorded.__setitem__(mod, copy.copy(o)))
                   for m in blocks + always]
        try:
            hidden = _text_hidden(model, inputs, text)
        finally:
            for h in handles:
                h.remove()
        ref = _logits(head, hidden)
        del hidden
        for i, g in enumerate(groups):
            # a module not called in the BF16 pass (the vision tower on a text-only batch) is not replayed
            skip = {m: recorded[m] for m in blocks[:g.block] + always if m in recorded}
            with _fp8_group(qw, g), _replayed(skip):
                sums[i] += _kl_sum(head, _text_hidden(model, inputs, text), ref)
        recorded.clear()
    summed = distributed.all_reduce([s for s in sums.cpu()])
    return {m: (float(summed[i]) if m == g.modules[0] else 0.0) for i, g in enumerate(groups) for m in g.modules}


__all__ = ["frozen_weights_with_input_grads", "gradient_scores", "kl_scores"]
