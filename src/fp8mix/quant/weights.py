"""A model's LM linears quantized as FP8 once, and their FP8 outputs: what scoring (gradient and KL) and the
study's control run each module's FP8 output with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..progress import Progress, no_progress
from . import fast
from .numerics import FP8Format, quantize_weight
from .scales import ReduceMax, calibrate_input_scales

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
    """FP8 weights (and, for fp8_static after ``calibrate``, input scales) of the named modules: quantized once and
    kept, or with ``cache=False`` at each use (low memory, same bytes)."""

    def __init__(self, model: nn.Module, names: Sequence[str], fmt: FP8Format, cache: bool = True):
        self.fmt = FP8Format(fmt)
        self.modules = {n: model.get_submodule(n) for n in names}
        self.weight_scales: dict[str, torch.Tensor | None] = {n: None for n in names}
        self.weights: Mapping = ({n: quantize_weight(m.weight, self.fmt) for n, m in self.modules.items()} if cache
                                 else _OnUse(self.modules, self.fmt, self.weight_scales))
        self.input_scales: dict[str, torch.Tensor | None] = {n: None for n in names}

    def calibrate(self, model: nn.Module, batches: list[dict], progress: Progress = no_progress,
                  reduce_max: ReduceMax | None = None) -> None:
        """fp8_static: each module's input scale, calibrated on ``batches`` (other formats quantize activations at
        run time). ``reduce_max``: see ``scales.calibrate_input_scales``."""
        if self.fmt is not FP8Format.fp8_static:
            return
        self.input_scales = calibrate_input_scales(model, self.modules, batches, progress, reduce_max)

    def output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The module's output with its weight and input in FP8."""
        w_fp8, w_scale = self.weights[name]
        bias = self.modules[name].bias
        return fast.linear_forward(x, w_fp8, bias, self.fmt, self.input_scales[name], weight_scale=w_scale)
