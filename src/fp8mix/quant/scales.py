"""Scales that depend on more than one tensor: fp8_static's calibrated input scales and fused-group sharing.

vLLM runs q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` with ONE per-tensor weight scale and ONE
input scale for the fused layer; handed one scale per member, it requantizes every member to the largest at load
time. The exporter writes that one scale (so nothing is requantized) and scoring quantizes with it (so a member's
scored error is the error it has when served). ``share_group_scales`` is the rule, for both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ..data.samples import model_inputs
from ..errors import FP8MixError
from ..progress import Progress, no_progress
from .numerics import static_input_scale

__all__ = ["calibrate_input_scales", "share_group_scales"]

ReduceMax = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def share_group_scales(groups: Iterable[Sequence[str]], scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per module of ``groups`` (each one fused group's module names), the max of its group's per-tensor scales,
    float32 [1]. absmax / 448 is monotone, so this is the scale of the group's absmax: the one vLLM would
    requantize the fused layer to. A group of one module keeps its own scale."""
    out = {}
    for members in groups:
        missing = [m for m in members if m not in scales]
        if missing:
            raise FP8MixError(f"no scale for {missing[0]}, a member of the fused group {list(members)}; "
                              "a fused group is quantized as a whole")
        if any(scales[m].numel() != 1 for m in members):
            raise FP8MixError(f"only per-tensor scales are shared in a fused group ({list(members)}); per-channel "
                              "and block scales belong to one weight")
        shared = torch.stack([scales[m].reshape(()).to(torch.float32) for m in members]).amax().reshape(1)
        for m in members:
            out[m] = shared.clone()
    return out


@torch.no_grad()
def calibrate_input_scales(model: nn.Module, modules: Iterable[str], batches: list[dict],
                           progress: Progress = no_progress, reduce_max: ReduceMax | None = None
                           ) -> dict[str, torch.Tensor]:
    """Each module's own fp8_static input scale, float32 [1]: the max |x| over every calibration token (padding
    included) / 448 (``static_input_scale``). ``reduce_max`` combines the maxima of several processes (scoring
    under torchrun passes its max all-reduce); without it only this process's batches count. Members of a fused
    group then share the largest (``share_group_scales``)."""
    mods = {n: model.get_submodule(n) for n in modules}
    amax = {n: torch.zeros((), dtype=torch.float32, device=m.weight.device) for n, m in mods.items()}

    def hook(name):
        def fn(_mod, args):
            amax[name] = torch.maximum(amax[name], args[0].detach().abs().amax().float())
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    try:
        for batch in progress(batches, "calibrating static FP8 input scales"):
            model(**model_inputs(batch), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if reduce_max is not None:
        names = list(amax)
        amax = dict(zip(names, reduce_max([amax[n] for n in names])))
    return {n: static_input_scale(a) for n, a in amax.items()}
