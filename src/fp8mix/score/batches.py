"""Calibration batches for scoring: samples → padded model inputs, in a fixed order."""

from __future__ import annotations

import torch

from ..data import sources
from ..data.samples import ChatSample, encode, fit_and_measure
from ..errors import FP8MixError
from .. import distributed
from .settings import AutoQuantSettings


def calibration_samples(settings: AutoQuantSettings) -> list[ChatSample]:
    samples = sources.load(settings.data, "calib", settings.calib_samples, settings.seed)
    if not settings.with_images:
        samples = [s.without_images() for s in samples]
    return samples


def fitted(processor, samples: list[ChatSample], max_pixels: int | None, max_length: int | None,
           what: str, by_length: bool = False) -> tuple[list[ChatSample], int]:
    """`fit_samples`, with an error when no sample fits (a count of the dropped ones otherwise). `by_length`: the
    kept samples longest first (ties in their order), so that batches of neighbours carry little padding; for
    passes whose result does not depend on how the samples are batched (the KL score, the control)."""
    kept, lengths, dropped = fit_and_measure(processor, samples, max_pixels, max_length)
    if not kept:
        raise FP8MixError(f"none of the {len(samples)} {what} samples fits in --max-length {max_length} tokens "
                          f"with images of at most --max-pixels {max_pixels}; raise --max-length or lower --max-pixels")
    if by_length and None not in lengths:
        kept = [kept[i] for i in sorted(range(len(kept)), key=lambda i: (-lengths[i], i))]
    return kept, dropped


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


def calibration_batches(processor, settings: AutoQuantSettings, device: torch.device | str = "cpu",
                        shard: bool = False, by_length: bool = False) -> tuple[list[dict[str, torch.Tensor]], int, int]:
    """The calibration batches of `settings` (scoring, and fp8_static's input scales at export): the samples
    fitted to `max_pixels`/`max_length`, batched in order (`by_length`: longest first, see `fitted`). Returns
    (batches, samples kept, samples dropped)."""
    samples, dropped = fitted(processor, calibration_samples(settings), settings.max_pixels, settings.max_length,
                              "calibration", by_length)
    return make_batches(processor, samples, settings.batch_size, settings.max_length, device, shard), \
        len(samples), dropped
