"""A model's LM linears quantized exactly as the exported checkpoint stores them, and their FP8 outputs.

Scoring (gradient and KL), the study's control and ModelOpt parity run each module's FP8 output from here, so a
scored error is the error of the served layer: the checkpoint's FP8 weight codes, its weight scale and (fp8_static)
its input scale, shared in fused groups as the exporter writes them (``scales.share_group_scales``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..progress import Progress, no_progress
from . import fast
from .numerics import FP8Format, compute_weight_scale, quantize_weight
from .scales import ReduceMax, calibrate_input_scales, share_group_scales

__all__ = ["QuantizedWeights"]


class _OnUse(Mapping):
    """FP8 weights quantized when asked for and not kept: the same bytes as the cached ones, without holding an FP8
    copy of every LM linear (half a byte per parameter of the BF16 model) for the whole pass."""

    def __init__(self, modules: dict[str, nn.Module], fmt: FP8Format, scales: dict[str, torch.Tensor | None]):
        self.modules, self.fmt, self.scales = modules, fmt, scales

    def __getitem__(self, name: str):
        return quantize_weight(self.modules[name].weight, self.fmt, self.scales[name])

    def __iter__(self):
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


class QuantizedWeights:
    """FP8 weights (and, for fp8_static after ``calibrate``, input scales) of the modules of ``groups``.

    ``groups``: the fused groups' in-memory module names (``LinearGroup.modules``). Under fp8_static every member
    of a group gets the group's one weight scale and one input scale, as in the checkpoint; a group of one module
    keeps its own (ModelOpt's auto_quantize numerics, for parity). fp8_dynamic and fp8_block scales are per channel
    or per block of one weight, so nothing is shared. Weights are quantized once and kept, or with ``cache=False``
    at each use (low memory, same bytes).
    """

    def __init__(self, model: nn.Module, groups: Iterable[Sequence[str]], fmt: FP8Format, cache: bool = True):
        self.fmt = FP8Format(fmt)
        groups = list(groups)
        if any(isinstance(g, str) for g in groups):
            raise TypeError("groups are sequences of module names; a module on its own is the group (name,)")
        self.groups = [tuple(g) for g in groups]
        self.modules = {n: model.get_submodule(n) for g in self.groups for n in g}
        self.weight_scales = self._weight_scales()
        self.weights: Mapping = ({n: quantize_weight(m.weight, self.fmt, self.weight_scales[n])
                                  for n, m in self.modules.items()} if cache
                                 else _OnUse(self.modules, self.fmt, self.weight_scales))
        self.input_scales: dict[str, torch.Tensor | None] = {n: None for n in self.modules}

    def _weight_scales(self) -> dict[str, torch.Tensor | None]:
        """fp8_static: the group-shared per-tensor scale; other formats: None (quantize_weight's own scale)."""
        if self.fmt is not FP8Format.fp8_static:
            return {n: None for n in self.modules}
        own = {n: compute_weight_scale(m.weight, self.fmt) for n, m in self.modules.items()}
        return share_group_scales(self.groups, own)

    def calibrate(self, model: nn.Module, batches: list[dict], progress: Progress = no_progress,
                  reduce_max: ReduceMax | None = None) -> None:
        """fp8_static: the input scales, calibrated on ``batches`` and shared in fused groups (other formats
        quantize activations at run time). ``reduce_max``: see ``scales.calibrate_input_scales``."""
        if self.fmt is not FP8Format.fp8_static:
            return
        own = calibrate_input_scales(model, self.modules, batches, progress, reduce_max)
        self.input_scales = share_group_scales(self.groups, own)

    def output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The module's output with its weight and input in FP8."""
        w_fp8, w_scale = self.weights[name]
        bias = self.modules[name].bias
        return fast.linear_forward(x, w_fp8, bias, self.fmt, self.input_scales[name], weight_scale=w_scale)
