"""The stages of a run, each reading and writing the run directory (see the README for its files)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import manifest
from .errors import FP8MixError
from .plan.catalog import Catalog, load_catalog
from .rundir import read_json, write_json

console = Console(stderr=True)


def progress(iterable, description: str):
    """A rich progress bar over a sized iterable."""
    items = list(iterable)
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
    device: str = "cpu"
    force: bool = False
    score_overrides: dict = field(default_factory=dict)   # AutoQuantSettings fields the user set


def _model_arg(opts: RunOptions) -> str | None:
    """The model: the one passed, else the one recorded in run.json (None = the embedded model)."""
    if opts.model is not None:
        return opts.model
    return manifest.load(opts.run).get("model", {}).get("path")


def overrides(opts: RunOptions) -> dict:
    """Scoring overrides: those recorded by earlier stages of this run, updated with the ones passed now."""
    return {**manifest.load(opts.run).get("score_overrides", {}), **opts.score_overrides}


def catalog_of(opts: RunOptions) -> tuple[Catalog, Path]:
    return load_catalog(opts.catalog or manifest.load(opts.run).get("catalog", {}).get("path"))


def score_path(run: Path, key: str) -> Path:
    return run / "scores" / f"{key}.json"


def stage_score(opts: RunOptions) -> dict[str, Path]:
    """Score once per distinct AutoQuant settings of the catalog; cached by the settings' hash."""
    from .models import loading
    from .score.sensitivity import score

    catalog, cat_path = catalog_of(opts)
    model_id, path = loading.resolve(_model_arg(opts))
    fingerprint = loading.fingerprint(path)
    wanted = {}
    over = overrides(opts)
    for name in catalog.schemes:
        s = catalog.settings(name, **over)
        wanted.setdefault(s.key(fingerprint), s)
    done, loaded, timings = {}, None, {}
    for key, settings in wanted.items():
        out = score_path(opts.run, key)
        if out.is_file() and not opts.force:
            console.print(f"scores {key}: cached ({settings.method}, {settings.calib_samples} samples)")
            done[key] = out
            continue
        if loaded is None:
            t = time.time()
            loaded = loading.load(None if model_id == loading.EMBEDDED_ID else str(path), device=opts.device)
            loaded.model_id = model_id
            timings["load_s"] = round(time.time() - t, 2)
        t = time.time()
        doc = score(loaded, settings, progress)
        timings[f"score_{key}_s"] = round(time.time() - t, 2)
        done[key] = write_json(out, "sensitivity", {**doc, "settings": settings.model_dump(mode="json")})
    default_key = catalog.settings(next(iter(catalog.schemes)), **over).key(fingerprint)
    sens = read_json(done[default_key], "sensitivity")
    sens.pop("schema")
    write_json(opts.run / "sensitivity.json", "sensitivity", sens)
    embedded = model_id == loading.EMBEDDED_ID
    manifest.update(opts.run, model={"id": model_id, "path": None if embedded else str(path),
                                     "fingerprint": fingerprint},
                    catalog={"path": None if opts.catalog is None else str(cat_path)}, device=opts.device,
                    score_overrides=over, seed=catalog.settings(next(iter(catalog.schemes)), **over).seed,
                    stages={"score": {"keys": sorted(done), **timings}})
    return done


def stage_plan(opts: RunOptions) -> dict[str, Path]:
    from .models import loading
    from .plan.planner import plan_scheme

    catalog, cat_path = catalog_of(opts)
    model_id, path = loading.resolve(_model_arg(opts))
    net, adapter = loading.build_empty(path)
    layout = adapter.layout(net)
    linears = adapter.all_lm_linears(net)
    fingerprint = manifest.load(opts.run).get("model", {}).get("fingerprint") or loading.fingerprint(path)
    out = {}
    for name in catalog.schemes:
        key = catalog.settings(name, **overrides(opts)).key(fingerprint)
        sens_file = score_path(opts.run, key)
        sens = read_json(sens_file, "sensitivity", hint="run `fp8mix score` first")
        plan = plan_scheme(name, catalog, sens, layout, adapter, linears)
        out[name] = write_json(opts.run / "plans" / f"{name}.json", "plan", plan)
    manifest.update(opts.run, stages={"plan": {"schemes": sorted(out)}})
    return out


def require_run(run: Path) -> None:
    if not (run / "run.json").is_file():
        raise FP8MixError(f"{run} is not a run directory (no run.json); start one with fp8mix score --out {run}")


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


STAGES = ("score", "plan")


def run_all(opts: RunOptions, stop_after: str | None = None) -> None:
    if stop_after is not None and stop_after not in STAGES:
        raise FP8MixError(f"unknown stage {stop_after!r}; stages: {', '.join(STAGES)}")
    funcs = {"score": stage_score, "plan": stage_plan}
    for name in STAGES:
        funcs[name](opts)
        if name == stop_after:
            break
