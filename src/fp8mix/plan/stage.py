"""`fp8mix plan`: one plan per catalog scheme, from the scores of the scheme's AutoQuant setting (run files only:
the model is neither loaded nor built)."""

from __future__ import annotations

from pathlib import Path

from .. import manifest
from ..context import RunOptions, catalog_of, overrides, score_path
from ..errors import FP8MixError
from ..rundir import read_json, write_json


def stage_plan(opts: RunOptions) -> dict[str, Path]:
    from .planner import plan_scheme

    catalog, _ = catalog_of(opts)
    fingerprint = manifest.load(opts.run).get("model", {}).get("fingerprint")
    if not fingerprint:
        raise FP8MixError(f"{opts.run / 'run.json'} records no scored model; run fp8mix score --out {opts.run} first")
    out = {}
    for name in catalog.schemes:
        key = catalog.settings(name, **overrides(opts)).key(fingerprint)
        sens_file = score_path(opts.run, key)
        sens = read_json(sens_file, "sensitivity", hint="run `fp8mix score` first")
        plan = plan_scheme(name, catalog, sens)
        out[name] = write_json(opts.run / "plans" / f"{name}.json", "plan", plan)
    manifest.update(opts.run, stages={"plan": {"schemes": sorted(out)}})
    return out
