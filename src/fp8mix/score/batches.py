"""Calibration batches for scoring: samples → padded model inputs, in a fixed order."""

from __future__ import annotations

import torch

from ..data import sources
from ..data.samples import ChatSample, encode
from .settings import AutoQuantSettings


def calibration_samples(settings: AutoQuantSettings) -> list[ChatSample]:
    samples = sources.load(settings.data, "calib", settings.calib_samples, settings.seed)
    if not settings.with_images:
        samples = [s.without_images() for s in samples]
    return samples


def make_batches(processor, samples: list[ChatSample], batch_size: int, max_length: int,
                 device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    out = []
    for k in range(0, len(samples), batch_size):
        enc = encode(processor, samples[k:k + batch_size], max_length=max_length)
        out.append({n: t.to(device) for n, t in enc.items()})
    return out
