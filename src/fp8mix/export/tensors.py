"""The checkpoints' safetensors shards, streamed from the source's in one pass: for every checkpoint written, one
output shard per source shard; one source tensor in memory at a time.

Every tensor keeps its legacy on-disk name (``model.layers.N…``, ``visual.…``, as transformers saves Qwen2.5-VL; a
source in the new layout is renamed to it). An FP8 module's ``weight`` becomes ``quant.numerics``' FP8 weight plus
its float32 scales, laid out as the writer's format stores them (``ScaleLayout``); it is quantized once for all the
checkpoints that hold it in the same format with the same fixed scale. Every other tensor is copied bit for bit,
as a byte range of the source file, or cast to BF16 first if the source stored a float tensor in another dtype.
Every output's layout (names, dtypes, shapes) is settled, and the plan checked against the source, before anything
is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import FP8MixError
from ..progress import Progress, no_progress
from ..quant.numerics import FP8Format, quantize_weight_chunked, weight_scale_shape
from ..timing import Phases
from .prepare import QuantizedModule
from .shard_writer import ST_DTYPES, ShardWriter, read_header
from .source import Source, memory_name, open_shard, source_files

__all__ = ["Output", "ScaleLayout", "shard_names", "write_tensors"]

# How one writer stores the scales: (weight_scale, input_scale) from quantize_weight's float32 scale.
ScaleLayout = Callable[[torch.Tensor, torch.Tensor | None, FP8Format], tuple[torch.Tensor, torch.Tensor | None]]
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass
class Output:
    """One checkpoint's tensors: its FP8 modules with their fixed scales, its format and scale layout, tensors of
    its own (e.g. KV-cache scales, by on-disk name, written into the last shard), and the seconds of its writes."""

    folder: Path
    quant: dict[str, QuantizedModule]
    fmt: FP8Format
    scale_layout: ScaleLayout
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    phases: Phases = field(default_factory=Phases)


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _entries(src: Source, out: Output, headers: list[dict]) -> list[list[tuple[str, str, list[int]]]]:
    """Per source shard, the output's (name, dtype, shape) in the order they are written; checks the plan."""
    shards, seen, owner = [], set(), {}
    for header in headers:
        entries = []
        for key, e in header.items():
            mem = memory_name(src.adapter, key)
            disk = src.adapter.to_disk(mem)
            if disk in owner:
                raise FP8MixError(f"the source checkpoint stores {disk} twice; it is corrupt")
            owner[disk] = key
            module = mem[: -len(".weight")] if mem.endswith(".weight") else None
            if module in out.quant:
                q = out.quant[module]
                if tuple(e.shape) != q.shape:
                    raise FP8MixError(f"{key} has shape {tuple(e.shape)}, the model config says {q.shape}")
                w_scale, x_scale = out.scale_layout(torch.zeros(weight_scale_shape(q.shape, out.fmt)),
                                                   q.input_scale, out.fmt)
                base = disk[: -len(".weight")]
                entries += [(disk, "F8_E4M3", list(e.shape)), (base + ".weight_scale", "F32", list(w_scale.shape))]
                if x_scale is not None:
                    entries.append((base + ".input_scale", "F32", list(x_scale.shape)))
                seen.add(module)
            else:
                entries.append((disk, "BF16" if e.dtype in FLOAT_DTYPES else e.dtype, e.shape))
        shards.append(entries)
    missing = sorted(set(out.quant) - seen)
    if missing:
        raise FP8MixError(f"the source checkpoint has no weight for {', '.join(missing[:5])}; "
                          "is it the model the plan was made for?")
    last = max((i for i, e in enumerate(shards) if e), default=0)
    for disk, t in sorted(out.extra.items()):
        if disk in owner:
            raise FP8MixError(f"{disk} is already a tensor of the source checkpoint")
        shards[last].append((disk, ST_DTYPES[t.dtype], list(t.shape)))
    return shards


def write_tensors(src: Source, outputs: list[Output], progress: Progress = no_progress,
                  phases: Phases | None = None) -> list[dict]:
    """Stream the source shards into every output's folder (the source read once); a summary per output.
    ``phases`` gets the seconds spent reading and quantizing; each output's own ``phases`` its writes."""
    ph = phases or Phases()
    files = source_files(src.path)
    headers = [_in_key_order(f) for f in files]
    layouts = [_entries(src, out, headers) for out in outputs]
    names = shard_names(len(files))
    weight_maps: list[dict[str, str]] = [{} for _ in outputs]
    totals, casts = [0] * len(outputs), [[] for _ in outputs]
    steps = iter(progress(range(sum(len(h) for h in headers)),
                          f"writing {len(outputs)} checkpoint(s) from {len(files)} source shard(s)"))
    last = max((i for i, h in enumerate(headers) if h), default=0)
    for i, (f, header) in enumerate(zip(files, headers)):
        writers = [ShardWriter(out.folder / names[i], lay[i], metadata={"format": "pt"}) if lay[i] else None
                   for out, lay in zip(outputs, layouts)]
        fd = os.open(f, os.O_RDONLY)
        try:
            with open_shard(f) as fh:
                for key, e in header.items():
                    next(steps)
                    _one_tensor(src, key, e, fd, fh, outputs, writers, casts, ph)
            for k, (out, w) in enumerate(zip(outputs, writers)):
                if w is None:
                    continue
                if i == last:
                    with out.phases("write"):
                        for disk, t in sorted(out.extra.items()):
                            w.write(disk, t)
                w.close()
                weight_maps[k].update({n: w.path.name for n in w.layout})
                totals[k] += w.nbytes
        finally:
            os.close(fd)
            for w in writers:  # after an error: the files closed, unfinished (the staged folders are removed)
                if w is not None:
                    w.close(check=False)
    for _ in steps:
        pass
    summaries = []
    for out, wm, total, cast in zip(outputs, weight_maps, totals, casts):
        n_shards = len(set(wm.values()))
        if n_shards > 1:
            (out.folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(wm.items()))},
                           indent=2) + "\n")
        summaries.append({"n_tensors": sum(len(h) for h in headers) + len(out.extra), "n_shards": n_shards,
                          "bytes": total, "cast_to_bf16": cast})
    return summaries


def _in_key_order(path: Path) -> dict:
    """The file's tensors in the order safetensors lists their names (sorted), not the header's (by dtype); a file
    safetensors cannot read is an error."""
    with open_shard(path) as fh:
        keys = list(fh.keys())
    header = read_header(path)
    return {k: header[k] for k in keys}


def _one_tensor(src: Source, key: str, e, fd: int, fh, outputs: list[Output], writers: list, casts: list,
                ph: Phases) -> None:
    """One source tensor into every output: FP8 (quantized once per format and fixed scale), cast, or copied."""
    mem = memory_name(src.adapter, key)
    disk = src.adapter.to_disk(mem)
    module = mem[: -len(".weight")] if mem.endswith(".weight") else None
    tensor, quantized = None, {}

    def source() -> torch.Tensor:
        nonlocal tensor
        if tensor is None:
            with ph("read"):
                tensor = fh.get_tensor(key)
        return tensor

    for out, w, cast in zip(outputs, writers, casts):
        q = out.quant.get(module) if module is not None else None
        if q is not None:
            fixed = q.weight_scale  # equal values quantize alike, whichever plan's tensor holds them
            memo = (out.fmt, None if fixed is None else fixed.detach().to("cpu", torch.float32).numpy().tobytes())
            if memo not in quantized:
                with ph("quantize"):
                    quantized[memo] = quantize_weight_chunked(source(), out.fmt, scale=q.weight_scale)
                if not bool(torch.isfinite(quantized[memo][1]).all()):
                    raise FP8MixError(f"{key} holds inf or NaN values, so its FP8 scale would too; the source "
                                      "checkpoint is damaged")
            w_fp8, w_scale = quantized[memo]
            w_scale, x_scale = out.scale_layout(w_scale, q.input_scale, out.fmt)
            base = disk[: -len(".weight")]
            with out.phases("write"):
                w.write(disk, w_fp8)
                w.write(base + ".weight_scale", w_scale.to(torch.float32))
                if x_scale is not None:
                    w.write(base + ".input_scale", x_scale.to(torch.float32))
        elif e.dtype in FLOAT_DTYPES and e.dtype != "BF16":
            t = source()
            cast.append(f"{key}: {t.dtype}")
            with out.phases("write"):
                w.write(disk, t.to(torch.bfloat16))
        else:
            with out.phases("write"):
                w.copy(disk, fd, e)
