"""What every stage takes: the run's options, and the few lookups they all need (the model argument, the scoring
overrides, the catalog) plus the progress bar and console. Stages share their run context through this module
only; none imports the pipeline or another stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import distributed, manifest
from .errors import FP8MixError
from .plan.catalog import Catalog, load_catalog

console = Console(stderr=True)


def progress(iterable, description: str):
    """A rich progress bar over a sized iterable (on the main process only, under torchrun)."""
    items = list(iterable)
    if not distributed.is_main():
        yield from items
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task(description, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


@dataclass
class RunOptions:
    run: Path
    model: str | None = None
    catalog: str | None = None
    device: str = "cpu"              # cpu, cuda, cuda:N or auto (resolved when the options are made)
    device_map: str | None = None    # "auto": accelerate spreads the model over this process's GPUs
    force: bool = False
    low_memory: bool = False         # scoring: no FP8 copies of the weights kept (same scores, less memory)
    score_overrides: dict = field(default_factory=dict)   # AutoQuantSettings fields the user set

    def __post_init__(self):
        self.device = distributed.resolve_device(self.device)  # "auto": the device actually used, from here on


def model_arg(opts: RunOptions) -> str | None:
    """The model: the one passed, else the one recorded in run.json (None = the embedded model)."""
    if opts.model is not None:
        return opts.model
    return manifest.load(opts.run).get("model", {}).get("path")


def overrides(opts: RunOptions) -> dict:
    """Scoring overrides: those recorded by earlier stages of this run, updated with the ones passed now. Without
    --data, the built-in data suited to the model (data.sources.default_source). A local data file or folder's
    samples are hashed into `data_digest`, now, so that scores and checkpoints of its older content are not reused."""
    from .data.sources import default_source, digest
    from .models.loading import EMBEDDED_ID

    over = {**manifest.load(opts.run).get("score_overrides", {}), **opts.score_overrides}
    over.setdefault("data", default_source(model_arg(opts) in (None, "embedded", EMBEDDED_ID)))
    over["data_digest"] = digest(over["data"])
    return {k: v for k, v in over.items() if v is not None}


def catalog_of(opts: RunOptions) -> tuple[Catalog, Path]:
    return load_catalog(opts.catalog or manifest.load(opts.run).get("catalog", {}).get("path"))


def score_path(run: Path, key: str) -> Path:
    """The cached scores of one AutoQuant setting (key: the settings' hash)."""
    return run / "scores" / f"{key}.json"


def require_run(run: Path) -> None:
    if not (run / "run.json").is_file():
        raise FP8MixError(f"{run} is not a run directory (no run.json); start one with fp8mix score --out {run}")


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
