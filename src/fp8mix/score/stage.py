"""`fp8mix score` (one scoring pass per distinct AutoQuant setting of the catalog, cached in scores/) and the
sensitivity study (the same scores under other configs, and the held-out control)."""

from __future__ import annotations

import time
from pathlib import Path

from .. import distributed, manifest
from ..context import RunOptions, catalog_of, console, model_arg, overrides, progress, score_path
from ..rundir import read_json, write_json


class ScoreCache:
    """Scoring passes cached in scores/<key>.json; the model is loaded on the first miss only."""

    def __init__(self, opts: RunOptions, model_id: str, path: Path):
        self.opts, self.model_id, self.path = opts, model_id, path
        self.loaded = None
        self.timings: dict = {}
        self.passes: dict[str, dict] = {}  # settings key -> seconds of its scoring pass (missing: cached)

    def model(self):
        from ..models import loading

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
        from .sensitivity import score

        out = score_path(self.opts.run, key)
        if out.is_file() and not self.opts.force:
            if distributed.is_main():
                console.print(f"scores {key}: cached ({settings.method}, {settings.calib_samples} samples)")
            return out
        loaded = self.model()
        t, parts = time.time(), {}
        doc = score(loaded, settings, progress, low_memory=self.opts.low_memory, timings=parts)
        self.timings[f"score_{key}_s"] = round(time.time() - t, 2)
        self.passes[key] = {"seconds": self.timings[f"score_{key}_s"], **parts}
        if distributed.is_main():
            write_json(out, "sensitivity", {**doc, "settings": settings.model_dump(mode="json")})
        distributed.barrier()
        return out


def stage_score(opts: RunOptions) -> dict[str, Path]:
    """Score once per distinct AutoQuant settings of the catalog; cached by the settings' hash."""
    from ..models import loading

    catalog, cat_path = catalog_of(opts)
    model_id, path = loading.resolve(model_arg(opts))
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


def stage_study(opts: RunOptions, n_control: int = 32) -> dict:
    """Score the default setting under the study's configs, compare them, and run the held-out control. run.json's
    study stage gets the seconds of each config's pass (batches and scoring apart; a config scored before is
    marked cached) and of the control."""
    import torch

    from ..data.sources import held_out
    from ..models import loading
    from ..quant.numerics import FP8Format
    from .batches import calibration_batches, fitted, make_batches
    from .study import check_blocks, consistently_sensitive, control, kind_patterns, rank_stability, study_configs

    t0 = time.time()
    catalog, _ = catalog_of(opts)
    model_id, path = loading.resolve(model_arg(opts))
    fingerprint = loading.fingerprint(path)
    base = catalog.settings(next(iter(catalog.schemes)), **overrides(opts))
    cache = ScoreCache(opts, model_id, path)
    docs, runs, configs = {}, [], {}
    for label, settings in study_configs(base):
        key = settings.key(fingerprint)
        doc = read_json(cache.get(key, settings), "sensitivity")
        check_blocks(doc["n_blocks"])  # before the other configs' passes
        docs[label] = doc
        runs.append({"label": label, "settings_key": key, "settings": doc["settings"], "blocks": doc["blocks"],
                     "groups": {g["name"]: g["score"] for g in doc["groups"]}})
        configs[label] = {"settings_key": key, "method": settings.method,
                          **cache.passes.get(key, {"cached": True})}
    if not distributed.is_main():  # the study's scoring passes were shared; the control runs on one process
        return {}
    loaded = cache.model()
    t = time.time()
    # the control's KL does not depend on the batching (as the KL score's; fp8_static's scales come from the
    # calibration batches below, not from these)
    samples, _ = fitted(loaded.processor, held_out(base.data, n_control), base.max_pixels, base.max_length,
                        "control", by_length=True)
    batches = make_batches(loaded.processor, samples, 8, base.max_length, opts.device)
    calib = None
    if base.fp8_format is FP8Format.fp8_static:  # the checkpoints' input scales, calibrated as export does
        torch.manual_seed(base.seed)
        calib = calibration_batches(loaded.processor, base, opts.device)[0]
    t_batches = time.time()
    model, adapter = loaded.model, loaded.adapter
    result = control(model, loaded.layout, docs["base"], batches, base.fp8_format, base.seed, progress,
                     layers=model.get_submodule(adapter.blocks_path),
                     vision=model.get_submodule(adapter.vision_path) if adapter.vision_path else None,
                     calib_batches=calib)
    control_s = {"seconds": round(time.time() - t, 2), "batches_s": round(t_batches - t, 2),
                 "pass_s": round(time.time() - t_batches, 2)}
    study = {
        "stability": rank_stability(docs),
        "consistently_sensitive_blocks": consistently_sensitive(docs),
        "patterns": kind_patterns(docs["base"], loaded.layout.n_blocks),
        "control": result,
        "control_samples": len(samples),
    }
    sens = read_json(opts.run / "sensitivity.json", "sensitivity", hint="run fp8mix score first")
    sens.pop("schema")
    sens.update(runs=runs, study=study)
    write_json(opts.run / "sensitivity.json", "sensitivity", sens)
    manifest.update(opts.run, stages={"study": {"seconds": round(time.time() - t0, 2), **cache.timings,
                                                "configs": configs, "control": control_s}})
    return study
