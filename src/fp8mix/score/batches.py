"""Calibration batches for scoring: samples → padded model inputs, in a fixed order."""

from __future__ import annotations

import torch

from ..data import sources
from ..data.samples import ChatSample, encode
from . import distributed
from .settings import AutoQuantSettings


def calibration_samples(settings: AutoQuantSettings) -> list[ChatSample]:
    samples = sources.load(settings.data, "calib", settings.calib_samples, settings.seed)
    if not settings.with_images:
        samples = [s.without_images() for s in samples]
    return samples


def make_batches(processor, samples: list[ChatSample], batch_size: int, max_length: int,
                 device: torch.device | str = "cpu", shard: bool = False) -> list[dict[str, torch.Tensor]]:
    """Padded batches of `batch_size` samples in order; with `shard`, only this rank's batches (batch i goes to
    rank i mod world size), so that data-parallel ranks score exactly the single-process batches between them."""
    chunks = [samples[k:k + batch_size] for k in range(0, len(samples), batch_size)]
    if shard:
        chunks = distributed.shard(chunks)
    out = []
    for chunk in chunks:
        enc = encode(processor, chunk, max_length=max_length)
        out.append({n: t.to(device) for n, t in enc.items()})
    return out
