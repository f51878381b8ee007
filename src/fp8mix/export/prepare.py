"""Which modules of a plan become FP8, and the scales of theirs that are not a function of their own weight alone.

The plan is checked against the model before anything is written: every fused group (q/k/v, gate/up) FP8 or BF16
as a whole, since vLLM runs it as one layer; only LM linears in FP8; an ignore list that names every BF16 linear
and no FP8 one. For fp8_static the weight and input scales are shared within each fused group
(``quant.scales.share_group_scales``: the one rule, also used by scoring); the other formats' weight scales are
computed by ``quant.numerics`` as each weight is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import FP8MixError
from ..models import FamilyAdapter, ModelLayout
from ..progress import no_progress
from ..quant.numerics import BLOCK, FP8Format, compute_weight_scale
from ..quant.scales import calibrate_input_scales, share_group_scales
from .source import Source, iter_tensors, load_for_calibration, memory_name

__all__ = ["KV_CACHE_FORMATS", "QuantizedModule", "check_plan", "plan_format", "plan_kv_cache", "quantize_plan"]


@dataclass
class QuantizedModule:
    """What one FP8 module needs besides its weight: a fixed weight scale (fp8_static: shared in its fused group;
    None = quantize_weight computes it) and the static input scale."""

    name: str                      # in-memory module name
    group: str                     # fused group name
    weight_scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    shape: tuple[int, int] = (0, 0)


def plan_format(plan: dict) -> FP8Format:
    try:
        return FP8Format(plan.get("fp8_format", FP8Format.fp8_dynamic.value))
    except ValueError:
        raise FP8MixError(f"plan {plan.get('scheme')!r} has an unknown fp8_format {plan.get('fp8_format')!r}; "
                          f"use one of {[f.value for f in FP8Format]}") from None


KV_CACHE_FORMATS = ("fp8",)


def plan_kv_cache(plan: dict) -> str | None:
    """The plan's KV-cache format: "fp8" (calibrated per-layer k/v scales, an e4m3 cache) or None (model dtype)."""
    kv = plan.get("kv_cache")
    if kv is not None and kv not in KV_CACHE_FORMATS:
        raise FP8MixError(f"plan {plan.get('scheme')!r} has an unknown kv_cache {kv!r}; use one of "
                          f"{list(KV_CACHE_FORMATS)} or none")
    return kv


# ---- the plan against the model --------------------------------------------------------------------------------

def check_plan(plan: dict, layout: ModelLayout, adapter: FamilyAdapter | None = None) -> dict[str, str]:
    """module -> group for the plan's FP8 modules; every fused group must be FP8 or BF16 as a whole."""
    for key in ("scheme", "fp8_modules", "ignore"):
        if key not in plan:
            raise FP8MixError(f"the plan has no {key!r}; rerun fp8mix plan")
    wanted = set(plan["fp8_modules"])
    group_of = {}
    for g in layout.groups:
        members = set(g.modules)
        inside = members & wanted
        if inside and inside != members:
            raise FP8MixError(f"plan {plan['scheme']!r} puts only part of the fused group {g.name} in FP8 "
                              f"({', '.join(sorted(inside))}); vLLM runs it as one layer: all or none")
        for m in inside:
            group_of[m] = g.name
    unknown = sorted(wanted - set(group_of))
    if unknown:
        raise FP8MixError(f"plan {plan['scheme']!r} names FP8 modules that are not LM linears of this model: "
                          f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}; was it planned for "
                          "another model? rerun fp8mix plan")
    _check_ignore_consistent(plan, layout, adapter)
    return group_of


def _ignored(entry_set: set[str], regexes: list, names: tuple[str, ...]) -> bool:
    return any(n in entry_set for n in names) or any(rx.fullmatch(n) for rx in regexes for n in names)


def _check_ignore_consistent(plan: dict, layout: ModelLayout, adapter: FamilyAdapter | None) -> None:
    """The ignore list must name every BF16 LM linear and no FP8 one: vLLM quantizes what is not ignored (and
    would then load a BF16 tensor into an FP8 parameter) and leaves an ignored FP8 weight unquantized."""
    if adapter is None:
        return
    entries = set(plan["ignore"])
    regexes = [re.compile(e[3:]) for e in plan["ignore"] if e.startswith("re:")]
    fp8 = set(plan["fp8_modules"])
    for g in layout.groups:
        for m in g.modules:
            ignored = _ignored(entries, regexes, (m, adapter.to_disk(m)))
            if m in fp8 and ignored:
                raise FP8MixError(f"plan {plan['scheme']!r} puts {m} in FP8 but its ignore list covers it; "
                                  "rerun fp8mix plan")
            if m not in fp8:
                for name, reader in ((adapter.to_disk(m), "vLLM"), (m, "transformers")):
                    if not _ignored(entries, regexes, (name,)):
                        raise FP8MixError(f"plan {plan['scheme']!r} keeps {m} in BF16 but its ignore list does not "
                                          f"name {name}: {reader} would quantize it; rerun fp8mix plan")


# ---- the FP8 modules and their fixed scales --------------------------------------------------------------------

def quantize_plan(src: Source, plan: dict, calib_batches: list[dict] | None = None, progress=None,
                  input_scales: dict[str, torch.Tensor] | None = None) -> dict[str, QuantizedModule]:
    """Per FP8 module: the scales that are not a function of its own weight alone (fp8_static): from
    ``input_scales`` (quant.scales.calibrate_input_scales, e.g. of every LM linear once for several exports) or
    else calibrated here on ``calib_batches``."""
    fmt = plan_format(plan)
    group_of = check_plan(plan, src.layout, src.adapter)
    shapes = {m: s for g in src.layout.groups for m, s in zip(g.modules, g.shapes)}
    out = {m: QuantizedModule(m, g, shape=tuple(shapes[m])) for m, g in group_of.items()}
    if fmt is FP8Format.fp8_block:
        bad = sorted(m for m, q in out.items() if q.shape[1] % BLOCK)
        if bad:
            raise FP8MixError(f"fp8_block quantizes activations in groups of {BLOCK} input features; "
                              f"{bad[0]} has {out[bad[0]].shape[1]}: use fp8_dynamic for this model")
    if fmt is not FP8Format.fp8_static or not out:
        return out
    names = sorted(out)
    if input_scales is None:
        if not calib_batches:
            raise FP8MixError(f"plan {plan['scheme']!r} is fp8_static: its input scales need calibration batches")
        if src.model is None:
            load_for_calibration(src)
        input_scales = calibrate_input_scales(src.model, names, calib_batches, progress or no_progress)
    missing = [m for m in names if m not in input_scales]
    if missing:
        raise FP8MixError(f"no calibrated input scale for {missing[0]} (and {len(missing) - 1} more)")
    by_group: dict[str, list[str]] = {}
    for m in names:
        by_group.setdefault(out[m].group, []).append(m)
    w_scales = share_group_scales(by_group.values(), _own_weight_scales(src, set(names), fmt))
    x_scales = share_group_scales(by_group.values(), input_scales)
    for m in names:
        out[m].weight_scale, out[m].input_scale = w_scales[m], x_scales[m]
    return out


def _own_weight_scales(src: Source, modules: set[str], fmt: FP8Format) -> dict[str, torch.Tensor]:
    """Each module's own weight scale, from the source weights read one at a time (fp8_static's shared scales)."""
    out = {}
    for _i, _n, key, get in iter_tensors(src.path):
        mem = memory_name(src.adapter, key)
        if mem.endswith(".weight") and mem[: -len(".weight")] in modules:
            out[mem[: -len(".weight")]] = compute_weight_scale(get(), fmt)
    missing = sorted(modules - set(out))
    if missing:
        raise FP8MixError(f"the source checkpoint has no weight for {', '.join(missing[:5])}; "
                          "is it the model the plan was made for?")
    return out
