"""The export stage: every plan of a run (or one scheme) as a checkpoint under ``checkpoints/``.

``checkpoints/<scheme>/`` (compressed-tensors) or ``checkpoints/<scheme>-modelopt/``. The weights stream from the
source's safetensors files, read once for all the checkpoints to write (as many as the free disk space holds at
once); the model is loaded (once, in BF16) only to calibrate fp8_static input scales and KV-cache scales. A
checkpoint whose ``fp8mix_plan.json`` records the same export key (plan sha256, writer, model fingerprint, fp8_static
calibration settings) is kept unless ``--force``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import manifest
from ..errors import FP8MixError
from ..context import RunOptions, catalog_of, console, model_arg, overrides, progress, require_run
from ..rundir import read_json
from ..quant.numerics import FP8Format
from ..quant.kv_cache import attention_modules, calibrate_kv_scales
from ..quant.scales import calibrate_input_scales
from ..timing import Phases
from .compressed_tensors import prepare_checkpoint
from .jobs import groups, write_checkpoints
from .marker import EXPORT_VERSION, export_key, read_marker
from .modelopt import prepare_modelopt, quant_algo
from .prepare import plan_format, plan_kv_cache
from .source import source_of

FORMATS = {"compressed-tensors": ("", prepare_checkpoint), "modelopt": ("-modelopt", prepare_modelopt)}


def checkpoint_dir(run: Path, scheme: str, fmt: str = "compressed-tensors") -> Path:
    return Path(run) / "checkpoints" / f"{scheme}{FORMATS[fmt][0]}"


def _plans(run: Path, scheme: str | None) -> dict[str, dict]:
    files = sorted((run / "plans").glob("*.json"))
    if not files:
        raise FP8MixError(f"{run / 'plans'} has no plans; run `fp8mix plan --run {run}` first")
    plans = {f.stem: read_json(f, "plan") for f in files}
    if scheme is not None:
        if scheme not in plans:
            raise FP8MixError(f"no plan for scheme {scheme!r} in {run / 'plans'}; plans: {', '.join(plans)}")
        plans = {scheme: plans[scheme]}
    return plans


def _calibration(opts: RunOptions, catalog, name: str):
    """The AutoQuant calibration settings of a scheme: fp8_static input scales are calibrated on the same data."""
    from ..score.settings import AutoQuantSettings

    over = overrides(opts)
    if name in catalog.schemes:
        return catalog.settings(name, **over)
    return AutoQuantSettings(**over)


def stage_export(opts: RunOptions, scheme: str | None = None, fmt: str = "compressed-tensors") -> dict[str, Path]:
    """Export every plan (or one scheme) of the run; returns {scheme: checkpoint folder}."""
    from ..models import loading
    from ..score.batches import calibration_batches

    t0 = time.time()
    if fmt not in FORMATS:
        raise FP8MixError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    require_run(opts.run)
    plans = _plans(opts.run, scheme)
    if fmt == "modelopt":
        refused = {}
        for n, p in plans.items():
            try:
                quant_algo(p)
            except FP8MixError as exc:
                refused[n] = exc
        if scheme is not None and refused:
            raise refused[scheme]
        for n, exc in refused.items():
            console.print(f"export {n}: skipped ({exc})")
            plans.pop(n)
    catalog, _ = catalog_of(opts)
    arg = model_arg(opts)
    model_id, path = loading.resolve(arg)
    fingerprint = manifest.load(opts.run).get("model", {}).get("fingerprint") or loading.fingerprint(path)

    todo, out, record = {}, {}, {}
    for name, plan in plans.items():
        dest = checkpoint_dir(opts.run, name, fmt)
        calib = None
        if plan_format(plan) is FP8Format.fp8_static or plan_kv_cache(plan) is not None:
            calib = _calibration(opts, catalog, name).model_dump(mode="json")
        key = export_key(plan, fmt, fingerprint, calib)
        marker = read_marker(dest) if dest.is_dir() else None
        out[name] = dest
        if marker and marker.get("export_key") == key and not opts.force:
            console.print(f"export {name}: up to date ({dest})")
            record[name] = {"path": str(dest), "skipped": True}
            continue
        todo[name] = (plan, dest, calib)

    timings: dict = {}
    if todo:
        # The weights stream from the source files; the model itself is loaded only to calibrate fp8_static
        # input scales (on --device, spread with --device-map auto).
        source_arg = str(path) if model_id != loading.EMBEDDED_ID else None
        src = source_of(source_arg)
        src.model_id = model_id
        loaded = None
        prepare = FORMATS[fmt][1]
        scales_cache: dict[str, dict] = {}   # calibration key -> input scales of every LM linear
        kv_cache: dict[str, dict] = {}       # calibration key -> KV-cache scales of every attention layer
        jobs = {}
        for name, (plan, dest, calib) in todo.items():
            scales = kv_scales = None
            if calib is not None:
                if loaded is None:
                    tl = time.time()
                    loaded = loading.load(source_arg, device=opts.device, dtype=torch.bfloat16,
                                          device_map=opts.device_map)
                    loaded.model_id = model_id
                    timings["load_s"] = round(time.time() - tl, 2)
                settings = _calibration(opts, catalog, name)
                k = settings.key(fingerprint)
                static = plan_format(plan) is FP8Format.fp8_static
                kv = plan_kv_cache(plan) is not None
                if (static and k not in scales_cache) or (kv and k not in kv_cache):
                    torch.manual_seed(settings.seed)
                    batches, _, _ = calibration_batches(loaded.processor, settings, opts.device)
                    tc = time.time()
                    if static and k not in scales_cache:
                        linears = [m for g in loaded.layout.groups for m in g.modules]
                        scales_cache[k] = calibrate_input_scales(loaded.model, linears, batches)
                    if kv and k not in kv_cache:
                        kv_cache[k] = calibrate_kv_scales(loaded.model, attention_modules(loaded.layout), batches)
                    timings[f"calibrate_{k}_s"] = round(time.time() - tc, 2)
                scales = scales_cache.get(k) if static else None
                kv_scales = kv_cache.get(k) if kv else None
            kw = {"kv_scales": kv_scales} if kv_scales is not None else {}
            jobs[name] = prepare(loaded if calib is not None else src, plan, dest, input_scales=scales,
                                 calibration=calib, **kw)
        # one pass over the source per group of checkpoints (a group fits the free disk space)
        phases = Phases()
        for group in groups(src, list(jobs.values())):
            write_checkpoints(src, group, progress, phases)
        timings.update(phases.rounded())
        for name, job in jobs.items():
            seconds = round(sum(job.output.phases.seconds.values()), 2)
            record[name] = {"path": str(job.out_dir), "seconds": seconds, "skipped": False,
                            **job.output.phases.rounded()}
            console.print(f"export {name}: wrote {job.out_dir}")
        timings["seconds"] = round(time.time() - t0, 2)

    previous = manifest.load(opts.run).get("stages", {}).get("export", {})
    checkpoints = dict(previous.get("checkpoints", {}))
    checkpoints.update({f"{n}{FORMATS[fmt][0]}": {**r, "format": fmt} for n, r in record.items()})
    manifest.update(opts.run, stages={"export": {"checkpoints": checkpoints, "export_version": EXPORT_VERSION,
                                                 **timings}})
    return out
