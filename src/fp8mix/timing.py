"""Seconds per phase, for the stage entries of run.json: ``with phases("read"): ...`` adds the block's wall time to
"read". CUDA work is waited for at the start and the end of a phase, so a phase counts the kernels it launched,
not whichever phase happens to wait for them (a few synchronizations per batch; nothing when CUDA is unused).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Phases"]


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


class Phases:
    """Accumulated seconds by phase name, in the order the phases first ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        """{phase + "_s": seconds to 0.01 s}, as run.json records them."""
        return {f"{k}_s": round(v, 2) for k, v in self.seconds.items()}
