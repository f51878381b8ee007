"""Run an exported checkpoint in fp8mix's FP8 numerics: every FP8 layer becomes an FP8Linear holding the
checkpoint's own FP8 weight and scales (so evaluation measures the bytes vLLM serves, with activations quantized
the way vLLM's kernels do); with an FP8 KV cache (``kv_cache_scheme`` and per-layer ``k_scale``/``v_scale``) every
LM attention layer attends over its post-RoPE keys and values as vLLM reads them back from the fp8 cache
(``quant.kv_cache``); every other tensor is the checkpoint's as stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import FP8MixError
from ..models import FamilyAdapter
from ..quant.kv_cache import attention_modules, kv_cache_quantized
from ..quant.numerics import FP8_DTYPE, FP8Format, FP8Linear

SCALE_SUFFIXES = (".weight_scale", ".input_scale")
KV_SUFFIXES = (".k_scale", ".v_scale")


def fp8_format_of(weight_scale: torch.Tensor, weight: torch.Tensor, has_input_scale: bool) -> FP8Format:
    """The format, read off the stored scale shapes."""
    if has_input_scale:
        return FP8Format.fp8_static
    if weight_scale.ndim == 2 and weight_scale.shape == (weight.shape[0], 1):
        return FP8Format.fp8_dynamic
    return FP8Format.fp8_block


@contextmanager
def scheme_applied(model: nn.Module, folder: Path, adapter: FamilyAdapter, changed: list[str] | None = None
                   ) -> Iterator[list[str]]:
    """Inside the block, `model` runs the checkpoint: each of its FP8 layers replaces the model's Linear (as an
    FP8Linear holding the checkpoint's FP8 weight and scales, on that Linear's device), and any other tensor that
    differs from the model's is copied in. On exit the model is the BF16 one again. Yields the FP8 module names.

    The checkpoint is read one tensor at a time and the model is not copied, so a model spread over several GPUs
    (device map) is evaluated in place, with at most one scheme's FP8 weights beside it. `changed`, when given,
    gets the names of the modules swapped and of the parameters overwritten."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FP8MixError(f"{folder} has no *.safetensors: export the scheme first (fp8mix export)")
    params = dict(model.named_parameters())
    attention = attention_modules(adapter.layout(model))   # before any Linear is swapped
    swapped: dict[str, nn.Module] = {}
    overwritten: dict[str, torch.Tensor] = {}
    kv: dict[str, dict[str, torch.Tensor]] = {}   # attention module -> {"k_scale", "v_scale"}
    try:
        with ExitStack() as stack:
            handles = [stack.enter_context(safe_open(f, "pt")) for f in files]
            where = {k: h for h in handles for k in h.keys()}
            for disk, fh in where.items():
                if disk.endswith(SCALE_SUFFIXES):
                    continue
                name = adapter.to_memory(disk)
                if disk.endswith(KV_SUFFIXES):
                    mod_name, _, kind = name.rpartition(".")
                    kv.setdefault(mod_name, {})[kind] = fh.get_tensor(disk).to(torch.float32).reshape(1)
                    continue
                if fh.get_slice(disk).get_dtype() == "F8_E4M3":
                    mod_name = name.rsplit(".", 1)[0]
                    base = disk.rsplit(".", 1)[0]
                    if base + ".weight_scale" not in where:
                        raise FP8MixError(f"{folder}: {disk} is FP8 but has no weight_scale")
                    linear = model.get_submodule(mod_name)
                    dev = linear.weight.device
                    t = fh.get_tensor(disk)
                    scale = where[base + ".weight_scale"].get_tensor(base + ".weight_scale")
                    inp = (where[base + ".input_scale"].get_tensor(base + ".input_scale")
                           if base + ".input_scale" in where else None)
                    bias = None if linear.bias is None else linear.bias.detach()
                    fp8 = FP8Linear(t.to(dev), scale.to(dev), bias, fp8_format_of(scale, t, inp is not None),
                                    None if inp is None else inp.to(dev))
                    parent, _, child = mod_name.rpartition(".")
                    swapped[mod_name] = linear
                    setattr(model.get_submodule(parent), child, fp8)
                elif name in params:
                    p = params[name]
                    t = fh.get_tensor(disk).to(device=p.device, dtype=p.dtype)
                    if not torch.equal(t, p.detach()):
                        overwritten.setdefault(name, p.detach().clone())
                        with torch.no_grad():
                            p.copy_(t)
                elif not name.endswith("_zero_point"):
                    raise FP8MixError(f"{folder}: tensor {disk} matches no parameter of the model")
        # an FP8 layer's bias is checked above against the BF16 Linear's, which the FP8Linear shares
        if changed is not None:
            changed += [*swapped, *overwritten]
        with ExitStack() as stack:
            scales = _kv_scales(folder, kv, attention)
            if scales:
                stack.enter_context(kv_cache_quantized(model, scales))
            yield sorted(swapped)
    finally:
        for mod_name, linear in swapped.items():
            parent, _, child = mod_name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
        with torch.no_grad():
            for name, old in overwritten.items():
                params[name].copy_(old)


def _kv_scales(folder: Path, kv: dict[str, dict[str, torch.Tensor]], attention: list[str]
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The checkpoint's KV-cache scales by attention module; none unless config.json declares a kv_cache_scheme
    (vLLM then runs an fp8 cache in every LM attention layer, at scale 1.0 where a layer has none stored), which
    then needs both scales of every layer in ``attention`` and no others."""
    qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    declared = qc.get("kv_cache_scheme") is not None
    if not declared:
        if kv:
            raise FP8MixError(f"{folder}: k_scale/v_scale tensors but no kv_cache_scheme in config.json; "
                              "re-export the scheme")
        return {}
    if not kv:
        raise FP8MixError(f"{folder}: config.json declares a kv_cache_scheme but the checkpoint has no k_scale/"
                          "v_scale tensors; re-export the scheme")
    half = sorted(m for m, d in kv.items() if set(d) != {"k_scale", "v_scale"})
    if half:
        raise FP8MixError(f"{folder}: {half[0]} has only one of k_scale and v_scale")
    missing = [m for m in attention if m not in kv]
    if missing:
        raise FP8MixError(f"{folder}: {missing[0]} has no k_scale/v_scale ({len(missing)} of {len(attention)} "
                          "attention layers), which vLLM would run with scale 1.0; re-export the scheme")
    other = sorted(set(kv) - set(attention))
    if other:
        raise FP8MixError(f"{folder}: k_scale/v_scale for {other[0]}, which is no LM attention layer")
    return {m: (d["k_scale"], d["v_scale"]) for m, d in sorted(kv.items())}


def checkpoint_bytes(folder: Path, adapter: FamilyAdapter, lm_linears: set[str]) -> tuple[int, int]:
    """(bytes of the LM linear weights and their scales, bytes of all safetensors files)."""
    lm = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                mod = adapter.to_memory(k).rsplit(".", 1)[0]
                if mod in lm_linears and not k.endswith(".bias"):
                    sl = fh.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    lm += n * torch.empty((), dtype=getattr(torch, _dtype_name(sl.get_dtype()))).element_size()
    total = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    return lm, total


def _dtype_name(st_dtype: str) -> str:
    return {"F8_E4M3": "float8_e4m3fn", "BF16": "bfloat16", "F16": "float16", "F32": "float32",
            "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8"}[st_dtype]

