"""The KL pieces the KL score and the study's control share: a batch's BF16 forward recorded once, FP8 variants of
it run stacked along the batch dimension, and Σ KL(p_BF16 ‖ p_FP8) over the text positions.

Text positions are the ones eval counts (evaluate.metrics.counted_positions): position t counts when token t+1 is
a real token and not an image placeholder or vision marker. Only their final hidden states go through the lm_head,
a slice of SLICE positions at a time.

`Recorded` runs a batch once in BF16 and keeps the output of the vision tower and of every decoder block. A
variant (a set of LM linears in FP8) changes nothing before its first FP8 block, so `Recorded.variants` replays
the vision tower and those blocks from the record and computes only the blocks from there on. It runs n variants
in one forward: the batch repeated n times along dim 0 (slice j = variant j), each FP8 linear quantized only in
the slices of the variants that have it. The FLOPs are those of n separate forwards; the kernel launches those of
one (a 3B block at a few thousand tokens is launch-bound on a GPU in eager mode). A row's result does not depend on
the other rows, up to the rounding of matrix products of another height (tested against full forwards).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..data.samples import model_inputs
from ..evaluate.metrics import counted_positions
from ..quant.weights import QuantizedWeights

# Positions whose logits exist at once: bounds the head's scratch memory to SLICE x vocab floats.
SLICE = 1024
# Variants run in one forward (the KL score stacks the 4 groups of a block; the control 4 block choices).
STACK = 4


def text_hidden(model: nn.Module, inputs: dict, text: torch.Tensor) -> torch.Tensor:
    """The final hidden states at the text positions ([n_text, hidden]): the model without its lm_head."""
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1]
    return hidden[text.to(hidden.device)]


def logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits of `hidden` ([n, hidden]), in the model's dtype, a slice of positions at a time."""
    device = head.weight.device
    return torch.cat([head(hidden[k:k + SLICE].to(device)) for k in range(0, max(len(hidden), 1), SLICE)])


def log_probs(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities of `hidden` through `head` ([n, vocab]), a slice of positions at a time."""
    return torch.cat([F.log_softmax(logits(head, hidden[k:k + SLICE]).float(), dim=-1)
                      for k in range(0, max(len(hidden), 1), SLICE)])


def kl_sum(head: nn.Module, hidden: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Σ over positions of KL(p_ref ‖ p), `ref` the reference's float32 log-probabilities (`log_probs`), p from
    `hidden` through `head`, a slice of positions at a time (float64, on the head's device)."""
    total = torch.zeros((), dtype=torch.float64, device=ref.device)
    for k in range(0, hidden.shape[0], SLICE):
        logq = F.log_softmax(logits(head, hidden[k:k + SLICE]).float(), dim=-1)
        total += F.kl_div(logq, ref[k:k + SLICE], reduction="sum", log_target=True).double()
    return total


def repeated(value, n: int):
    """`value` with every tensor repeated n times along dim 0 (lists, tuples, dicts and model outputs item by
    item). n = 1: a shallow copy (callers may replace fields of a returned model output in place; Qwen2.5-VL
    splits the vision tower's pooler_output so)."""
    if n == 1:
        return copy.copy(value)
    if isinstance(value, torch.Tensor):
        return value.repeat(n, *[1] * (value.dim() - 1)) if value.dim() else value
    if isinstance(value, dict):  # transformers' ModelOutput is a dict too
        out = copy.copy(value)
        for k, v in value.items():
            out[k] = repeated(v, n)
        return out
    if isinstance(value, (list, tuple)):
        items = [repeated(v, n) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


@contextmanager
def patched(forwards: dict[nn.Module, object]):
    """Modules whose forward is replaced for the duration. Any forward already set on the instance (accelerate's
    device-map hook) is put back afterwards."""
    saved = {mod: mod.__dict__.get("forward") for mod in forwards}
    for mod, fwd in forwards.items():
        mod.forward = fwd
    try:
        yield
    finally:
        for mod, fwd in saved.items():
            if fwd is None:
                del mod.forward  # back to the class's forward
            else:
                mod.forward = fwd


def fp8_forwards(qw: QuantizedWeights, variants: Sequence[Iterable[str]]) -> dict[nn.Module, object]:
    """Forwards for a batch stacked len(variants) times along dim 0: a module named in variants[j] computes slice j
    in FP8 (qw.output: so the BF16 product is not computed and thrown away), the other slices in BF16. With one
    variant: its modules in FP8."""
    n = len(variants)
    slots: dict[str, set[int]] = {}
    for j, names in enumerate(variants):
        for name in names:
            slots.setdefault(name, set()).add(j)
    out = {}
    for name, js in slots.items():
        mod = qw.modules[name]
        if len(js) == n:
            out[mod] = lambda x, name=name: qw.output(name, x)
        else:
            out[mod] = lambda x, name=name, js=js, bf16=mod.forward: _mixed(qw, name, bf16, js, n, x)
    return out


def _mixed(qw: QuantizedWeights, name: str, bf16, fp8_slots: set[int], n: int, x: torch.Tensor) -> torch.Tensor:
    """One module's output on a stacked input: slice j in FP8 when j is in fp8_slots, else BF16. Neighbouring
    slices of the same kind go through one product (no product is computed twice)."""
    rows = x.shape[0] // n
    assert rows * n == x.shape[0], "a stacked input's first dimension is the batch repeated once per variant"
    parts, start = [], 0
    for j in range(1, n + 1):
        if j == n or (j in fp8_slots) != (start in fp8_slots):
            part = x[start * rows:j * rows]
            parts.append(qw.output(name, part) if start in fp8_slots else bf16(part))
            start = j
    return torch.cat(parts)


@contextmanager
def fp8_modules(qw: QuantizedWeights, names: Iterable[str]):
    """Run the named modules in FP8 (their forward swapped for the FP8 one)."""
    with patched(fp8_forwards(qw, [list(names)])):
        yield


class Recorded:
    """One batch's BF16 forward: the text positions' final hidden states (`hidden`) and, with `layers` (the decoder
    blocks) and `vision` (the vision tower) given, each one's output and the position ids, to replay in FP8
    variants of the batch."""

    def __init__(self, model: nn.Module, batch: dict, placeholders: list[int], layers: nn.ModuleList | None = None,
                 vision: nn.Module | None = None):
        self.model, self.inputs = model, model_inputs(batch)
        self.text = counted_positions(batch, placeholders)[0]
        self.blocks, self.always = list(layers or []), [vision] if vision is not None else []
        # each call's output in call order (the vision tower runs once for images and once for videos)
        self.outputs: dict[nn.Module, list] = {}
        handles = [m.register_forward_hook(lambda mod, _a, o: self.outputs.setdefault(mod, []).append(copy.copy(o)))
                   for m in self.blocks + self.always]
        # the position ids the model computed (Qwen-VL's M-RoPE index: a loop over the samples, about 55 small ops
        # and a device sync each), handed to the text model that holds the blocks; given back to every variant
        self.positions = None
        text_model = next((m for m in model.modules() if getattr(m, "layers", None) is layers), None) \
            if layers is not None else None
        if text_model is not None:
            handles.append(text_model.register_forward_pre_hook(
                lambda _m, _a, kw: setattr(self, "positions", kw.get("position_ids")), with_kwargs=True))
        try:
            self.hidden = text_hidden(model, self.inputs, self.text)
        finally:
            for h in handles:
                h.remove()
        self._stacked: dict[int, dict] = {}

    @property
    def n_text(self) -> int:
        return int(self.hidden.shape[0])

    def variants(self, qw: QuantizedWeights, variants: Sequence[Iterable[str]], first_block: int) \
            -> list[torch.Tensor]:
        """The text positions' final hidden states of each variant (variants[j]: the modules in FP8; none of them
        before block `first_block`), from one forward of the batch stacked len(variants) times. The vision tower
        and the blocks before `first_block` return their recorded outputs (a module not called in the BF16 pass,
        the vision tower on a text-only batch, is not replayed)."""
        n = len(variants)
        if n not in self._stacked:
            inputs = repeated(self.inputs, n) if n > 1 else dict(self.inputs)
            if self.positions is not None:  # [..., batch, seq]: the batch repeated as the inputs are
                inputs["position_ids"] = torch.cat([self.positions] * n, dim=-2)
            self._stacked[n] = inputs
        calls = {m: iter(self.outputs[m]) for m in self.blocks[:first_block] + self.always if m in self.outputs}
        replays = {m: (lambda *_a, _calls=c, **_k: repeated(next(_calls), n)) for m, c in calls.items()}
        with patched(fp8_forwards(qw, variants)), patched(replays):
            hidden = text_hidden(self.model, self._stacked[n], self.text.repeat(n, 1))
        return list(hidden.split(self.n_text))


__all__ = ["SLICE", "STACK", "Recorded", "fp8_forwards", "fp8_modules", "kl_sum", "log_probs", "logits", "patched",
           "repeated", "text_hidden"]
