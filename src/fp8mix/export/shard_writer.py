"""Write one safetensors file a tensor at a time.

Written by hand because safetensors' ``save_file`` takes a dict of every tensor of the file, so an export would hold a
whole output shard in memory beside the input shard it reads; this writer holds one tensor. The file is the standard
format (8-byte little-endian header size, JSON header with dtype / shape / data_offsets and ``__metadata__``, then
the data, with no gaps), read back by safetensors itself in the tests. Tensors go to one scratch file per element
size and are concatenated largest size first, so each tensor starts aligned to its element size.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
             torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
COPY_CHUNK = 16 << 20


class ShardWriter:
    """``add`` tensors, then ``close`` writes the file at ``path``."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path, self.metadata = Path(path), metadata or {}
        self.parts: dict[int, tempfile._TemporaryFileWrapper] = {}
        self.entries: dict[str, tuple[int, str, list[int], int, int]] = {}  # name -> (size, dtype, shape, start, end)
        self.nbytes = 0

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.entries:
            raise ValueError(f"{name} written twice to {self.path.name}")
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in ST_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name")
        size = t.element_size()
        part = self.parts.get(size)
        if part is None:
            part = self.parts[size] = tempfile.TemporaryFile(dir=self.path.parent)
        start = part.tell()
        part.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.entries[name] = (size, ST_DTYPES[t.dtype], list(t.shape), start, part.tell())
        self.nbytes += part.tell() - start

    def close(self) -> None:
        header, base = {}, 0
        for size in sorted(self.parts, reverse=True):
            for name, (s, dtype, shape, start, end) in self.entries.items():
                if s == size:
                    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [base + start, base + end]}
            base += self.parts[size].tell()
        if self.metadata:
            header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors' own writer pads it
        with open(self.path, "wb") as out:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            for size in sorted(self.parts, reverse=True):
                part = self.parts[size]
                part.seek(0)
                shutil.copyfileobj(part, out, COPY_CHUNK)
                part.close()
        self.parts = {}


__all__ = ["ShardWriter"]
