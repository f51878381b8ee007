"""The run's evaluation set: held-out samples of the run's data, never calibrated on, fitted to the run's
--max-pixels/--max-length. Both engines (transformers' emulation, vLLM serving the checkpoints) and the check
stage, which serves the same samples on its engines, take it from here, so every figure is over the same
samples and the same pixels."""

from __future__ import annotations

from dataclasses import dataclass

from ..context import RunOptions, catalog_of, overrides
from ..data import sources
from ..data.samples import ChatSample
from ..errors import FP8MixError
from ..score.batches import fitted


@dataclass
class EvalSet:
    data: str                  # the data source
    samples: list[ChatSample]  # fitted, in order
    n_dropped: int             # held-out samples longer than max_length
    max_length: int
    max_pixels: int | None


def eval_set(opts: RunOptions, n_eval: int, processor) -> EvalSet:
    """`n_eval` held-out samples of the run's data, checked disjoint from every scheme's calibration set."""
    if n_eval < 1:
        raise FP8MixError(f"--eval-samples must be at least 1 (got {n_eval})")
    catalog, _ = catalog_of(opts)
    over = overrides(opts)
    base = catalog.settings(next(iter(catalog.schemes)), **over)
    data = base.data
    samples = sources.held_out(data, n_eval)
    distinct = {st.model_dump_json(): st for st in (catalog.settings(name, **over) for name in catalog.schemes)}
    # once per setting; a text-only setting's samples as drawn, with the images it calibrates without
    calib = {s.fingerprint() for st in distinct.values() for s in sources.load(st.data, "calib", st.calib_samples,
                                                                              st.seed)}
    if calib & {s.fingerprint() for s in samples}:
        raise FP8MixError("the evaluation set shares samples with the calibration set; pass other --data")
    kept, dropped = fitted(processor, samples, base.max_pixels, base.max_length, "evaluation")
    return EvalSet(data, kept, dropped, base.max_length, base.max_pixels)
