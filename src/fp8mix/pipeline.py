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
from .score import distributed

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
    device: str = "cpu"
    device_map: str | None = None    # "auto": accelerate spreads the model over this process's GPUs
    force: bool = False
    low_memory: bool = False         # scoring: no FP8 copies of the weights kept (same scores, less memory)
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


class ScoreCache:
    """Scoring passes cached in scores/<key>.json; the model is loaded on the first miss only."""

    def __init__(self, opts: RunOptions, model_id: str, path: Path):
        self.opts, self.model_id, self.path = opts, model_id, path
        self.loaded = None
        self.timings: dict = {}

    def model(self):
        from .models import loading

        if self.loaded is None:
            t = time.time()
            embedded = self.model_id == loading.EMBEDDED_ID
            self.loaded = loading.load(None if embedded else str(self.path), device=self.opts.device,
                                       device_map=self.opts.device_map)
            self.loaded.model_id = self.model_id
            self.timings["load_s"] = round(time.time() - t, 2)
            placed = getattr(self.loaded.model, "hf_device_map", None) or {}
            if self.opts.device_map:  # how accelerate spread the model: device-map entries per device
                self.timings["placement"] = {str(d): sum(1 for v in placed.values() if v == d)
                                             for d in sorted(set(placed.values()), key=str)}
        return self.loaded

    def get(self, key: str, settings) -> Path:
        """The scores file of `settings`, scored now if missing. Under torchrun every rank takes part in the pass
        and the main one writes the file; the barrier keeps every rank's view of the cache the same."""
        from .score.sensitivity import score

        out = score_path(self.opts.run, key)
        if out.is_file() and not self.opts.force:
            if distributed.is_main():
                console.print(f"scores {key}: cached ({settings.method}, {settings.calib_samples} samples)")
            return out
        t = time.time()
        doc = score(self.model(), settings, progress, low_memory=self.opts.low_memory)
        self.timings[f"score_{key}_s"] = round(time.time() - t, 2)
        if distributed.is_main():
            write_json(out, "sensitivity", {**doc, "settings": settings.model_dump(mode="json")})
        distributed.barrier()
        return out


def stage_score(opts: RunOptions) -> dict[str, Path]:
    """Score once per distinct AutoQuant settings of the catalog; cached by the settings' hash."""
    from .models import loading

    catalog, cat_path = catalog_of(opts)
    model_id, path = loading.resolve(_model_arg(opts))
    fingerprint = loading.fingerprint(path)
    wanted = {}
    over = overrides(opts)
    for name in catalog.schemes:
        s = catalog.settings(name, **over)
        wanted.setdefault(s.key(fingerprint), s)
    cache = ScoreCache(opts, model_id, path)
    done = {key: cache.get(key, settings) for key, settings in wanted.items()}
    timings = cache.timings
    if not distributed.is_main():
        return done
    default_key = catalog.settings(next(iter(catalog.schemes)), **over).key(fingerprint)
    sens = read_json(done[default_key], "sensitivity")
    sens.pop("schema")
    old = opts.run / "sensitivity.json"
    if old.is_file():  # keep a study made on the same scores
        prev = read_json(old, "sensitivity")
        if prev.get("settings_key") == sens["settings_key"]:
            sens.update({k: prev[k] for k in ("runs", "study") if k in prev})
    write_json(opts.run / "sensitivity.json", "sensitivity", sens)
    embedded = model_id == loading.EMBEDDED_ID
    manifest.update(opts.run, model={"id": model_id, "path": None if embedded else str(path),
                                     "fingerprint": fingerprint},
                    catalog={"path": None if opts.catalog is None else str(cat_path)}, device=opts.device,
                    hardware=manifest.hardware(opts.device),
                    processes={"score": distributed.world_size(), "device_map": opts.device_map},
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


def stage_study(opts: RunOptions, n_control: int = 32) -> dict:
    """Score the default setting under the study's configs, compare them, and run the held-out control."""
    from .evaluate.stage import eval_samples
    from .models import loading
    from .score.batches import fitted, make_batches
    from .score.study import consistently_sensitive, control, kind_patterns, rank_stability, study_configs

    t0 = time.time()
    catalog, _ = catalog_of(opts)
    model_id, path = loading.resolve(_model_arg(opts))
    fingerprint = loading.fingerprint(path)
    base = catalog.settings(next(iter(catalog.schemes)), **overrides(opts))
    cache = ScoreCache(opts, model_id, path)
    docs, runs = {}, []
    for label, settings in study_configs(base):
        key = settings.key(fingerprint)
        doc = read_json(cache.get(key, settings), "sensitivity")
        docs[label] = doc
        runs.append({"label": label, "settings_key": key, "settings": doc["settings"], "blocks": doc["blocks"],
                     "groups": {g["name"]: g["score"] for g in doc["groups"]}})
    if not distributed.is_main():  # the study's scoring passes were shared; the control runs on one process
        return {}
    loaded = cache.model()
    samples, _ = fitted(loaded.processor, eval_samples(base.data, n_control), base.max_pixels, base.max_length,
                        "control")
    batches = make_batches(loaded.processor, samples, 8, base.max_length, opts.device)
    study = {
        "stability": rank_stability(docs),
        "consistently_sensitive_blocks": consistently_sensitive(docs),
        "patterns": kind_patterns(docs["base"], loaded.layout.n_blocks),
        "control": control(loaded.model, loaded.layout, docs["base"], batches, base.fp8_format, base.seed),
        "control_samples": len(samples),
    }
    sens = read_json(opts.run / "sensitivity.json", "sensitivity", hint="run fp8mix score first")
    sens.pop("schema")
    sens.update(runs=runs, study=study)
    write_json(opts.run / "sensitivity.json", "sensitivity", sens)
    manifest.update(opts.run, stages={"study": {"seconds": round(time.time() - t0, 2), **cache.timings}})
    return study


STAGES = ("score", "study", "plan", "export", "check", "eval", "report")


def _files(run: Path, *patterns: str) -> list[Path]:
    return sorted(f for pat in patterns for f in run.glob(pat))


def stage_io(opts: RunOptions, name: str, catalog_file: Path) -> tuple[list[Path], list[Path]]:
    """(input files, output files) of a stage, for resuming: a stage whose outputs exist and whose inputs (and
    options) are unchanged since it last ran is skipped. score and export keep their own caches."""
    run = opts.run
    marks = "checkpoints/*/fp8mix_plan.json"
    return {
        "study": (_files(run, "scores/*.json"), [run / "sensitivity.json"]),
        "plan": (_files(run, "scores/*.json") + [catalog_file], _files(run, "plans/*.json") or [run / "plans"]),
        "check": (_files(run, "plans/*.json", marks), _files(run, "checks/*.json") or [run / "checks"]),
        "eval": (_files(run, "plans/*.json", marks), [run / "eval.json"]),
        "report": ([run / "sensitivity.json", run / "eval.json", catalog_file]
                   + _files(run, "plans/*.json", "checks/*.json"), [run / "report.md", run / "summary.json"]),
    }.get(name, ([], []))


def _digest(paths: list[Path], extra: dict) -> str:
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in paths:
        h.update(str(p.name).encode())
        h.update(p.read_bytes() if p.is_file() else b"-")
    return h.hexdigest()[:16]


def run_all(opts: RunOptions, stop_after: str | None = None, stage_args: dict | None = None) -> None:
    """Every stage in order. A stage whose outputs exist and whose inputs are unchanged is skipped (--force
    redoes it)."""
    if stop_after is not None and stop_after not in STAGES:
        raise FP8MixError(f"unknown stage {stop_after!r}; stages: {', '.join(STAGES)}")
    import importlib

    from .check.live import vllm_python

    stage_args = stage_args or {}
    _, cat_file = catalog_of(opts)
    for name in STAGES:
        console.rule(f"[bold]{name}")
        inputs, outputs = stage_io(opts, name, cat_file)
        extra = {"overrides": overrides(opts), "args": stage_args.get(name, {}), "device": opts.device,
                 "vllm": vllm_python() if name == "check" else None}
        digest = _digest(inputs, extra) if inputs else None
        recorded = manifest.load(opts.run).get("stages", {}).get(name, {})
        done = digest and recorded.get("inputs") == digest and all(p.exists() for p in outputs)
        if done and not opts.force and (name != "study" or "study" in read_json(outputs[0], "sensitivity")):
            console.print(f"{name}: up to date (inputs unchanged), skipped")
        else:
            if name in ("score", "study", "plan"):
                globals()[f"stage_{name}"](opts, **stage_args.get(name, {}))
            else:
                module = importlib.import_module(f".{'evaluate' if name == 'eval' else name}.stage", __package__)
                getattr(module, f"stage_{name}")(opts, **stage_args.get(name, {}))
            if inputs:
                new_inputs, _ = stage_io(opts, name, cat_file)
                manifest.update(opts.run, stages={name: {**manifest.load(opts.run)["stages"].get(name, {}),
                                                         "inputs": _digest(new_inputs, extra)}})
        if name == stop_after:
            break
