"""The checkpoint's safetensors shards, streamed from the source's: one output shard per source shard, one tensor in
memory at a time.

Every tensor keeps its legacy on-disk name (``model.layers.N…``, ``visual.…``, as transformers saves Qwen2.5-VL; a
source in the new layout is renamed to it). An FP8 module's ``weight`` becomes ``quant.numerics``' FP8 weight plus
its float32 scales, laid out as the writer's format stores them (``ScaleLayout``); every other tensor is copied bit
for bit, cast to BF16 only if the source stored a float tensor in another dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..errors import FP8MixError
from ..quant.numerics import FP8Format, quantize_weight_chunked
from .prepare import QuantizedModule
from .shard_writer import ShardWriter
from .source import Source, iter_tensors, memory_name

__all__ = ["ScaleLayout", "shard_names", "write_tensors"]

# How one writer stores the scales: (weight_scale, input_scale) from quantize_weight's float32 scale.
ScaleLayout = Callable[[torch.Tensor, torch.Tensor | None, FP8Format], tuple[torch.Tensor, torch.Tensor | None]]


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_tensors(src: Source, quant: dict[str, QuantizedModule], fmt: FP8Format, out_dir: Path,
                  scale_layout: ScaleLayout, extra: dict[str, torch.Tensor] | None = None) -> dict:
    """Stream the source shards into out_dir (ShardWriter holds one tensor). ``extra``: tensors that are not the
    source's (e.g. KV-cache scales) by on-disk name, written into the last shard. Returns a summary."""
    adapter = src.adapter
    shard, writer = None, None
    weight_map, total, seen, cast = {}, 0, set(), []
    names = []

    def flush():
        nonlocal total
        if writer is None:
            return
        writer.close()
        for k in writer.entries:
            weight_map[k] = writer.path.name
        total += writer.nbytes

    for i, n, key, get in iter_tensors(src.path):
        if i != shard:
            flush()
            shard, writer = i, ShardWriter(out_dir / shard_names(n)[i], metadata={"format": "pt"})
        mem = memory_name(adapter, key)
        disk = adapter.to_disk(mem)
        if disk in weight_map or disk in writer:
            raise FP8MixError(f"the source checkpoint stores {disk} twice; it is corrupt")
        module = mem[: -len(".weight")] if mem.endswith(".weight") else None
        t = get()
        if module in quant:
            q = quant[module]
            if tuple(t.shape) != q.shape:
                raise FP8MixError(f"{key} has shape {tuple(t.shape)}, the model config says {q.shape}")
            w_fp8, w_scale = quantize_weight_chunked(t, fmt, scale=q.weight_scale)
            del t
            w_scale, x_scale = scale_layout(w_scale, q.input_scale, fmt)
            base = disk[: -len(".weight")]
            writer.add(disk, w_fp8)
            writer.add(base + ".weight_scale", w_scale.to(torch.float32))
            if x_scale is not None:
                writer.add(base + ".input_scale", x_scale.to(torch.float32))
            seen.add(module)
        else:
            if t.is_floating_point() and t.dtype != torch.bfloat16:
                cast.append(f"{key}: {t.dtype}")
                t = t.to(torch.bfloat16)
            writer.add(disk, t)
        names.append(disk)
    for disk, t in sorted((extra or {}).items()):
        if disk in weight_map or disk in writer:
            raise FP8MixError(f"{disk} is already a tensor of the source checkpoint")
        writer.add(disk, t)
        names.append(disk)
    flush()
    missing = sorted(set(quant) - seen)
    if missing:
        raise FP8MixError(f"the source checkpoint has no weight for {', '.join(missing[:5])}; "
                          "is it the model the plan was made for?")
    n_shards = len(set(weight_map.values()))
    if n_shards > 1:
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                       indent=2) + "\n")
    return {"n_tensors": len(names), "n_shards": n_shards, "bytes": total, "cast_to_bf16": cast}
