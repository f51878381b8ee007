"""Load an exported checkpoint into fp8mix's FP8 numerics: every FP8 layer becomes an FP8Linear holding the
checkpoint's own FP8 weight and scales (so evaluation measures the bytes vLLM serves, with activations quantized
the way vLLM's kernels do); every other tensor is taken from the checkpoint as stored."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import FP8MixError
from ..models import FamilyAdapter
from ..score.fp8 import FP8_DTYPE, FP8Format, FP8Linear

SCALE_SUFFIXES = (".weight_scale", ".input_scale")


def fp8_format_of(weight_scale: torch.Tensor, weight: torch.Tensor, has_input_scale: bool) -> FP8Format:
    """The format, read off the stored scale shapes."""
    if has_input_scale:
        return FP8Format.fp8_static
    if weight_scale.ndim == 2 and weight_scale.shape == (weight.shape[0], 1):
        return FP8Format.fp8_dynamic
    return FP8Format.fp8_block


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FP8MixError(f"{folder} has no *.safetensors: export the scheme first (fp8mix export)")
    out = {}
    for f in files:
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def load_quantized(reference: nn.Module, folder: Path, adapter: FamilyAdapter) -> tuple[nn.Module, list[str]]:
    """A copy of `reference` carrying the checkpoint's weights; returns (model, FP8 module names)."""
    tensors = read_tensors(folder)
    model = copy.deepcopy(reference)
    dtype = next(reference.parameters()).dtype
    fp8_modules = []
    params = dict(model.named_parameters())
    for disk, t in tensors.items():
        if disk.endswith(SCALE_SUFFIXES):
            continue
        name = adapter.to_memory(disk)
        if t.dtype == FP8_DTYPE:
            mod_name = name.rsplit(".", 1)[0]
            base = disk.rsplit(".", 1)[0]
            scale = tensors.get(base + ".weight_scale")
            if scale is None:
                raise FP8MixError(f"{folder}: {disk} is FP8 but has no weight_scale")
            inp = tensors.get(base + ".input_scale")
            linear = model.get_submodule(mod_name)
            fmt = fp8_format_of(scale, t, inp is not None)
            bias = None if linear.bias is None else linear.bias.detach()
            fp8 = FP8Linear(t.to(linear.weight.device), scale.to(linear.weight.device), bias, fmt,
                            None if inp is None else inp.to(linear.weight.device))
            parent, _, child = mod_name.rpartition(".")
            setattr(model.get_submodule(parent), child, fp8)
            fp8_modules.append(mod_name)
        elif name in params:
            with torch.no_grad():
                params[name].copy_(t.to(dtype))
        elif not name.endswith("_zero_point"):
            raise FP8MixError(f"{folder}: tensor {disk} matches no parameter of the model")
    # a bias stored for an FP8 layer was loaded into the replaced Linear's parameter above: carry it over
    for mod_name in fp8_modules:
        b = tensors.get(adapter.to_disk(mod_name) + ".bias")
        if b is not None:
            model.get_submodule(mod_name).bias = b.to(dtype)
    return model, sorted(fp8_modules)


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

