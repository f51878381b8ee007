"""AutoQuant sensitivity: how much each LM linear hurts the loss when it alone runs in FP8.

Gradient method (ModelOpt's auto_quantize score): for module m with BF16 output Y and FP8 output Y_q,
    score(m) = Σ over calibration batches and output elements of (∂L/∂Y ⊙ (Y_q − Y))²,
a second-order Taylor estimate of the loss increase with the empirical Fisher in place of the Hessian. L is the
model's next-token loss on the batch (transformers' mean cross-entropy over the labelled tokens: the assistant
replies). Each module is perturbed alone, the rest of the network in BF16 — yet one forward/backward serves every
module: the forward hook computes ΔY = Y_q − Y beside the normal output (the network keeps running on Y), and a
gradient hook on Y multiplies it with ∂L/∂Y. Only activations get gradients; weights are frozen.

KL method: for each group, one extra forward with only that group in FP8; score = Σ over tokens of
KL(p_BF16 ‖ p_group-FP8) of the next-token distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..data.samples import model_inputs
from ..models import LinearGroup
from . import distributed, fast_fp8
from .fp8 import FP8Format, quantize_weight, static_input_scale

Progress = Callable[[Iterable, str], Iterable]


def _no_progress(it: Iterable, _desc: str) -> Iterable:
    return it


class _OnUse(Mapping):
    """FP8 weights quantized when asked for and not kept: the same bytes as the cached ones, without holding an FP8
    copy of every LM linear (half a byte per parameter of the BF16 model) for the whole pass."""

    def __init__(self, modules: dict[str, nn.Module], fmt: FP8Format):
        self.modules, self.fmt = modules, fmt

    def __getitem__(self, name: str):
        return quantize_weight(self.modules[name].weight, self.fmt)

    def __iter__(self):
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


class QuantizedWeights:
    """FP8 weights (and, for fp8_static, calibrated input scales) of the scored modules: computed once and kept, or
    with `cache=False` recomputed at each use (low memory)."""

    def __init__(self, model: nn.Module, names: list[str], fmt: FP8Format, cache: bool = True):
        self.fmt = FP8Format(fmt)
        self.modules = {n: model.get_submodule(n) for n in names}
        self.weights: Mapping = ({n: quantize_weight(m.weight, self.fmt) for n, m in self.modules.items()} if cache
                                 else _OnUse(self.modules, self.fmt))
        self.input_scales: dict[str, torch.Tensor | None] = {n: None for n in names}

    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches: list[dict], progress: Progress = _no_progress,
                  across_ranks: bool = True) -> None:
        """fp8_static: the per-tensor input scale from the max |x| over every calibration token (under torchrun,
        every rank's tokens, unless `across_ranks` is off because only this process calibrates)."""
        if self.fmt is not FP8Format.fp8_static:
            return
        amax = {n: torch.zeros((), dtype=torch.float32, device=m.weight.device) for n, m in self.modules.items()}

        def hook(name):
            def fn(_mod, args):
                amax[name] = torch.maximum(amax[name], args[0].detach().abs().amax().float())
            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in self.modules.items()]
        try:
            for batch in progress(batches, "calibrating static FP8 input scales"):
                model(**model_inputs(batch), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if across_ranks:
            names = list(amax)
            amax = dict(zip(names, distributed.all_reduce([amax[n] for n in names], "max")))
        self.input_scales = {n: static_input_scale(a) for n, a in amax.items()}

    def output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The module's output with its weight and input in FP8."""
        w_fp8, w_scale = self.weights[name]
        bias = self.modules[name].bias
        return fast_fp8.linear_forward(x, w_fp8, bias, self.fmt, self.input_scales[name], weight_scale=w_scale)



@contextmanager
def _frozen_weights_with_input_grads(model: nn.Module):
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
                    progress: Progress = _no_progress, cache_weights: bool = True) -> dict[str, float]:
    """Per-module gradient scores (sum over all batches; under torchrun, over every rank's batches)."""
    names = [m for g in groups for m in g.modules]
    qw = QuantizedWeights(model, names, fmt, cache_weights)
    qw.calibrate(model, batches, progress)
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
        with _frozen_weights_with_input_grads(model):
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


@torch.no_grad()
def kl_scores(model: nn.Module, groups: list[LinearGroup], batches: list[dict], fmt: FP8Format,
              progress: Progress = _no_progress, cache_weights: bool = True) -> dict[str, float]:
    """Per-group KL scores, reported on the group's first module (the group is the unit of the KL method)."""
    qw = QuantizedWeights(model, [m for g in groups for m in g.modules], fmt, cache_weights)
    qw.calibrate(model, batches, progress)
    out = {m: 0.0 for g in groups for m in g.modules}
    for batch in progress(batches, "scoring (KL, one forward per group)"):
        inputs = model_inputs(batch)
        mask = batch["attention_mask"].bool()
        ref = F.log_softmax(model(**inputs, use_cache=False).logits.float(), dim=-1)[mask]
        for g in groups:
            with _fp8_group(qw, g):
                logq = F.log_softmax(model(**inputs, use_cache=False).logits.float(), dim=-1)[mask]
            out[g.modules[0]] += float(F.kl_div(logq, ref, reduction="sum", log_target=True))
    names = list(out)
    summed = distributed.all_reduce([torch.tensor(out[n], dtype=torch.float64) for n in names])
    return {n: float(v) for n, v in zip(names, summed)}


__all__ = ["QuantizedWeights", "gradient_scores", "kl_scores"]
