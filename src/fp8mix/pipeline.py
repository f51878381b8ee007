"""A run: the stages in order, each skipped when its outputs exist and its inputs are unchanged (resume).

Each stage lives in its package's `stage.py` and takes the run context (`fp8mix.context.RunOptions`); this module
only orders them and decides what to redo."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import manifest
from .context import RunOptions, catalog_of, console, overrides
from .errors import FP8MixError
from .rundir import read_json

STAGES = ("score", "study", "plan", "export", "check", "eval", "report")


def stage_functions() -> dict:
    """Each stage's function, by name (imported here, when a run starts: each pulls in its own dependencies)."""
    from .check.stage import stage_check
    from .evaluate.stage import stage_eval
    from .export.stage import stage_export
    from .plan.stage import stage_plan
    from .report.stage import stage_report
    from .score.stage import stage_score, stage_study

    return {"score": stage_score, "study": stage_study, "plan": stage_plan, "export": stage_export,
            "check": stage_check, "eval": stage_eval, "report": stage_report}


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
        "eval": (_files(run, "plans/*.json", marks, "checks/served/*.json"), [run / "eval.json"]),
        "report": ([run / "sensitivity.json", run / "eval.json", catalog_file]
                   + _files(run, "plans/*.json", "checks/*.json", "bench.json"), [run / "report.md", run / "summary.json"]),
    }.get(name, ([], []))


def _digest(paths: list[Path], extra: dict) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in paths:
        h.update(str(p.name).encode())
        h.update(p.read_bytes() if p.is_file() else b"-")
    return h.hexdigest()[:16]


def run_all(opts: RunOptions, stop_after: str | None = None, stage_args: dict | None = None,
            study: bool = True) -> None:
    """Every stage in order (the study only with `study`, for a quick run). A stage whose outputs exist and whose
    inputs are unchanged is skipped (--force redoes it)."""
    if stop_after is not None and stop_after not in STAGES:
        raise FP8MixError(f"unknown stage {stop_after!r}; stages: {', '.join(STAGES)}")
    from .check.live import vllm_python

    functions = stage_functions()
    stage_args = stage_args or {}
    _, cat_file = catalog_of(opts)
    for name in STAGES:
        console.rule(f"[bold]{name}")
        if name == "study" and not study:
            console.print("study: left out of this run (--no-study)")
            if name == stop_after:
                break
            continue
        inputs, outputs = stage_io(opts, name, cat_file)
        extra = {"overrides": overrides(opts), "args": stage_args.get(name, {}), "device": opts.device,
                 "vllm": vllm_python() if name in ("check", "eval") else None}
        digest = _digest(inputs, extra) if inputs else None
        recorded = manifest.load(opts.run).get("stages", {}).get(name, {})
        done = digest and recorded.get("inputs") == digest and all(p.exists() for p in outputs)
        if done and not opts.force and (name != "study" or "study" in read_json(outputs[0], "sensitivity")):
            console.print(f"{name}: up to date (inputs unchanged), skipped")
        else:
            functions[name](opts, **stage_args.get(name, {}))
            if inputs:
                new_inputs, _ = stage_io(opts, name, cat_file)
                manifest.update(opts.run, stages={name: {**manifest.load(opts.run)["stages"].get(name, {}),
                                                         "inputs": _digest(new_inputs, extra)}})
        if name == stop_after:
            break
