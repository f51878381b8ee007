"""Write one safetensors file a tensor at a time, straight into place; read a source file's tensors as raw bytes.

Written by hand because safetensors' ``save_file`` takes a dict of every tensor of the file, so an export would hold a
whole output shard in memory beside the input shard it reads. Here the layout is fixed first, from every tensor's
name, dtype and shape (``ShardWriter(path, entries)``): the header is written at once and each tensor's bytes go to
their own offset when they come (``write`` from a tensor, ``copy`` from a byte range of another file, in the kernel
where it can), so the data is written once and one tensor is held at a time. The file is the standard format
(8-byte little-endian header size, JSON header with dtype / shape / data_offsets and ``__metadata__``, padded with
spaces to 8 bytes, then the data with no gaps), read back by safetensors itself in the tests. The data is laid out
by element size, largest first, then in the order of ``entries``, so each tensor starts aligned to its element
size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["COPY_CHUNK", "ST_DTYPES", "ShardWriter", "SourceEntry", "element_size", "read_header"]

ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
             torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "U16": 2,
          "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
COPY_CHUNK = 16 << 20


def element_size(st_dtype: str) -> int:
    if st_dtype not in _SIZES:
        raise ValueError(f"safetensors dtype {st_dtype} is not supported")
    return _SIZES[st_dtype]


@dataclass(frozen=True)
class SourceEntry:
    """Where one tensor's bytes lie in a safetensors file."""

    dtype: str         # safetensors dtype name
    shape: list[int]
    offset: int        # from the start of the file
    nbytes: int


def read_header(path: Path) -> dict[str, SourceEntry]:
    """The tensors of a safetensors file by name, in the header's order."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    start = 8 + n
    return {k: SourceEntry(v["dtype"], list(v["shape"]), start + v["data_offsets"][0],
                           v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


class ShardWriter:
    """``ShardWriter(path, [(name, dtype, shape), ...])``, then ``write`` or ``copy`` every tensor, then ``close``."""

    def __init__(self, path: Path, entries: list[tuple[str, str, list[int]]], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.layout: dict[str, tuple[str, list[int], int, int]] = {}  # name -> (dtype, shape, start, end) in the data
        self.nbytes = 0  # bytes of tensor data (the header not counted)
        for size in sorted({element_size(d) for _, d, _ in entries}, reverse=True):
            for name, dtype, shape in entries:
                if element_size(dtype) != size:
                    continue
                if name in self.layout:
                    raise ValueError(f"{name} written twice to {self.path.name}")
                end = self.nbytes + math.prod(shape) * size
                self.layout[name] = (dtype, list(shape), self.nbytes, end)
                self.nbytes = end
        header = {n: {"dtype": d, "shape": s, "data_offsets": [a, b]} for n, (d, s, a, b) in self.layout.items()}
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors' own writer pads it
        self.data_start = 8 + len(raw)
        self.pending = set(self.layout)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            self._pwrite(len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(self.fd, self.data_start + self.nbytes)
        except BaseException:
            os.close(self.fd)
            raise

    def __contains__(self, name: str) -> bool:
        return name in self.layout

    def _place(self, name: str, dtype: str, shape: list[int]) -> int:
        if name not in self.pending:
            raise ValueError(f"{name} is not in the layout of {self.path.name} or was written already")
        want_dtype, want_shape, start, _end = self.layout[name]
        if (dtype, list(shape)) != (want_dtype, want_shape):
            raise ValueError(f"{name}: {dtype} {list(shape)} where the layout of {self.path.name} has "
                             f"{want_dtype} {want_shape}")
        self.pending.discard(name)
        return self.data_start + start

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in ST_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name")
        offset = self._place(name, ST_DTYPES[t.dtype], list(t.shape))
        if t.numel():
            self._pwrite(t.reshape(-1).view(torch.uint8).numpy().data, offset)

    def copy(self, name: str, src_fd: int, entry: SourceEntry) -> None:
        """The tensor's bytes from another file, unchanged (copy_file_range where the kernel has it)."""
        offset = self._place(name, entry.dtype, entry.shape)
        done = 0
        while done < entry.nbytes:
            n = min(COPY_CHUNK, entry.nbytes - done)
            try:
                n = os.copy_file_range(src_fd, self.fd, n, entry.offset + done, offset + done)
            except (AttributeError, OSError):  # no copy_file_range here (other OS, file systems, sandboxes)
                n = len(chunk := os.pread(src_fd, n, entry.offset + done))
                self._pwrite(chunk, offset + done)
            if n <= 0:
                raise OSError(f"{self.path.name}: could not copy {name} ({done} of {entry.nbytes} bytes)")
            done += n

    def close(self, check: bool = True) -> None:
        """Close the file (again: nothing); with ``check``, an error if a tensor of the layout was not written."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if check and self.pending:
            raise ValueError(f"{self.path.name}: {len(self.pending)} tensor(s) of the layout not written, e.g. "
                             f"{sorted(self.pending)[0]}")
