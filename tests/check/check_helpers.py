"""Helpers of the check tests."""

import json
import shutil

import torch
from safetensors.torch import load_file, save_file


def plan_of(run, scheme):
    return json.loads((run / "plans" / f"{scheme}.json").read_text())


def broken_copy(src, dst, *, ignore_edit=None, bf16_modules=()):
    """A copy of a checkpoint with its ignore list edited and/or some FP8 layers turned back into BF16 tensors."""
    shutil.copytree(src, dst)
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if ignore_edit:
        cfg["quantization_config"]["ignore"] = ignore_edit(cfg["quantization_config"]["ignore"])
    cfg_path.write_text(json.dumps(cfg, indent=2))
    if bf16_modules:
        for f in dst.glob("*.safetensors"):
            tensors = load_file(f)
            for m in bf16_modules:
                if m + ".weight" in tensors:
                    w = tensors[m + ".weight"].to(torch.float32) * tensors.pop(m + ".weight_scale").to(torch.float32)
                    tensors[m + ".weight"] = w.to(torch.bfloat16)
            save_file(tensors, f, metadata={"format": "pt"})
    return dst


# Held-out samples of the checked run's evaluation set (the live check's engines serve them)
N_EVAL = 64


def with_doubled_weight_scale(src, dst, module):
    """A copy of a checkpoint in which one FP8 layer's weight scales are doubled (its output doubles)."""
    shutil.copytree(src, dst)
    key = module + ".weight_scale"
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        if key in tensors:
            tensors[key] = tensors[key] * 2
            tmp = f.with_suffix(".tmp")
            save_file(tensors, tmp, metadata={"format": "pt"})
            tmp.replace(f)
            return dst
    raise AssertionError(f"{src} has no {key}")
