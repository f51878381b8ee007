"""The model an export reads: its folder's safetensors files, tensor by tensor, and what is known about it.

A ``Source`` is made from a model already in memory (a ``LoadedModel``: its folder's files are still what is read,
its model only calibrates fp8_static input scales) or from a model folder, hub id or None (the embedded model),
read without weights. Tensors come from the files, not from a state dict, so an export holds one tensor at a time
and copies BF16 tensors bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import FP8MixError
from ..models import FamilyAdapter, ModelLayout

__all__ = ["Source", "iter_tensors", "load_for_calibration", "memory_name", "open_shard", "source_files",
           "source_of"]


@dataclass
class Source:
    """Where the weights come from, and what is known about the model."""

    path: Path
    model_id: str
    fingerprint: str
    adapter: FamilyAdapter
    layout: ModelLayout
    config: dict
    model: torch.nn.Module | None = None       # only needed to calibrate fp8_static input scales
    processor: object | None = None
    generation_config: object | None = None


def source_of(loaded_or_model_path) -> Source:
    """A Source from a LoadedModel, or from a model folder / hub id / None (embedded), read without weights (a
    Source is returned as it is)."""
    from ..models import loading

    if isinstance(loaded_or_model_path, Source):
        return loaded_or_model_path
    if isinstance(loaded_or_model_path, loading.LoadedModel):
        lm = loaded_or_model_path
        return Source(Path(lm.path), lm.model_id, lm.fingerprint, lm.adapter, lm.layout,
                      loading.read_config(Path(lm.path)), lm.model, lm.processor,
                      getattr(lm.model, "generation_config", None))
    arg = None if loaded_or_model_path is None else str(loaded_or_model_path)
    model_id, path = loading.resolve(arg)
    net, adapter = loading.build_empty(path)
    return Source(path, model_id, loading.fingerprint(path), adapter, adapter.layout(net), loading.read_config(path))


def load_for_calibration(src: Source) -> None:
    """Load the source's model in BF16 (a Source read from files has none): fp8_static calibrates on it."""
    from ..models import loading

    arg = None if src.model_id == loading.EMBEDDED_ID else str(src.path)
    lm = loading.load(arg, dtype=torch.bfloat16)
    src.model, src.processor = lm.model, lm.processor
    src.generation_config = getattr(lm.model, "generation_config", None)


def memory_name(adapter: FamilyAdapter, key: str) -> str:
    """In-memory name of an on-disk tensor name, whichever of the two layouts the source was saved in."""
    for mem, _disk in adapter.disk_prefixes:
        if key == mem or key.startswith(mem + "."):
            return key
    return adapter.to_memory(key)


def source_files(path: Path) -> list[Path]:
    """The model folder's safetensors shards, in the order its index names them (or the one file)."""
    from ..models import loading

    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return loading.safetensors_files(path)


def iter_tensors(path: Path) -> Iterator[tuple[int, int, str, Callable[[], torch.Tensor]]]:
    """(shard index, shard count, on-disk name, loader) for every tensor of the source, shard by shard; a tensor is
    read only when its loader is called."""
    files = source_files(path)
    for i, f in enumerate(files):
        with open_shard(f) as fh:
            for key in fh.keys():
                yield i, len(files), key, (lambda fh=fh, key=key: fh.get_tensor(key))


def open_shard(path: Path):
    """``safe_open`` on a source shard (which checks its header, and that its data covers the file); a file
    safetensors cannot read is an error."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt")
    except FileNotFoundError:
        raise FP8MixError(f"{path} is missing: the model folder's index names it") from None
    except SafetensorError as exc:
        raise FP8MixError(f"{path} is not a valid safetensors file ({exc}): the checkpoint is corrupt") from None
