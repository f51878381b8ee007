"""`fp8mix check`: the static vLLM rule check of every exported checkpoint (a scheme's ModelOpt export beside it,
``checkpoints/<scheme>-modelopt/``, too, by vLLM's ModelOpt rules), then the live vLLM check where vLLM is
importable (compressed-tensors checkpoints): each checkpoint served once, its layers inspected, its outputs
compared with the BF16 source served by vLLM (see fidelity.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .. import manifest
from ..distributed import release_gpu_cache
from ..errors import FP8MixError
from ..context import RunOptions, catalog_of, model_arg, overrides, progress
from ..rundir import read_json, write_json
from .fidelity import bf16_reference, compare, probe_requests
from .live import (CPU_FORMATS, RequestSet, Runner, engine_settings, folder_key, serve, vllm_python,
                   write_served)
from .static import check_static, cpu_fp8_kv_cache_reason, kv_head_dim, served_kv_cache_errors


def live_check(folder: Path, plan: dict, adapter, layout, reference: dict, extra: RequestSet | None = None,
               engine: dict | None = None, runner: Runner | None = None) -> tuple[dict, dict]:
    """Serve one checkpoint (one engine start, by `runner` or a process of its own): layer dtypes, the KV cache's
    dtype and scales as vLLM runs them, load warnings, outputs against the BF16 reference. Returns (the live
    verdict, the served document: outputs by request id, timings, vLLM version)."""
    fp8 = [adapter.to_disk(m) for m in plan["fp8_modules"]]
    bf16 = [adapter.to_disk(m) for m in plan["bf16_modules"]]
    ref_ok = reference.get("ok")
    requests = probe_requests(reference["outputs"] if ref_ok else None)
    if extra is not None:
        requests.extend(extra)
    res = (runner.serve if runner is not None else serve)(folder, requests, fp8, bf16, engine=engine)
    if not res["ran"]:
        return {"ran": False, "ok": None, "reason": res["reason"]}, {}
    errors = list(res.get("errors", []))
    live = {"ran": True, "vllm_version": res.get("vllm_version"), "warnings": res.get("warnings", [])[:20],
            "layers": res.get("layers", {}), "attention": res.get("attention", {}),
            "timings_s": res.get("timings_s", {})}
    if res.get("layers"):  # the engine started and its layers were read
        errors += served_kv_cache_errors(folder, plan, live["attention"], layout, adapter)
    if ref_ok:
        fid = compare(res.get("outputs", {}), reference["outputs"])
        live["fidelity"] = {k: fid[k] for k in ("metrics", "tolerances", "probes")}
        if res.get("outputs"):  # a checkpoint that did not serve at all already has its error
            errors += [f"outputs: {e}" for e in fid["errors"]]
    else:
        errors.append("no BF16 reference to compare with: the BF16 source failed in vLLM ("
                      + "; ".join(reference.get("errors") or [reference.get("reason") or "unknown"])[:300] + ")")
    live["errors"] = errors
    live["ok"] = bool(res.get("ok")) and not errors
    served = {"model": str(folder), "model_key": folder_key(folder), "vllm_version": res.get("vllm_version"),
              "extra_key": extra.key() if extra is not None else None, "timings_s": res.get("timings_s", {}),
              "outputs": res.get("outputs", {})} if res.get("outputs") else {}
    return live, served


def check_folder(folder: Path, plan: dict, net, adapter, layout, live: bool, on_gpu: bool,
                 reference: Callable[[], dict] | None = None, extra: RequestSet | None = None,
                 engine: dict | None = None, runner: Runner | None = None) -> tuple[dict, dict]:
    """The static check, then (when `live` and the format runs here) the live check against `reference()`, the
    BF16 source's served outputs. Returns (the verdict, the served document; empty when nothing was served)."""
    static = check_static(folder, plan, net, adapter, layout)
    result = {"scheme": plan["scheme"], "checkpoint": str(folder), "fp8_format": plan["fp8_format"],
              "static": static}
    outputs: dict = {}
    if not live:
        result["live"] = {"ran": False, "ok": None, "reason": "skipped (--no-live)"}
    elif not static["ok"]:
        result["live"] = {"ran": False, "ok": None, "reason": "skipped: the static check failed"}
    elif not on_gpu and plan["fp8_format"] not in CPU_FORMATS:
        result["live"] = {"ran": False, "ok": None,
                          "reason": f"vLLM's CPU build has no kernels for {plan['fp8_format']}; static check only"}
    elif not on_gpu and plan.get("kv_cache") and (why := cpu_fp8_kv_cache_reason(kv_head_dim(net, layout))):
        result["live"] = {"ran": False, "ok": None, "reason": f"not served here: {why}; static check only"}
    elif reference is None:
        raise FP8MixError("the live check needs the BF16 source's served outputs")
    else:
        result["live"], outputs = live_check(folder, plan, adapter, layout, reference(), extra, engine, runner)
    result["ok"] = static["ok"] and result["live"]["ok"] is not False
    return result, outputs


def stage_check(opts: RunOptions, live: bool = True, n_eval: int = 64) -> dict[str, dict]:
    """Check every scheme's checkpoint. With the live check, the engines also serve the evaluation set of
    `n_eval` held-out samples (`evaluate.served.eval_requests`; none when 0), the BF16 source's included, so
    that the served eval loads no checkpoint again; every engine's outputs are written to
    checks/served/<name>.json (`live.served_outputs` reads them) as soon as it is served. One vLLM process
    (`live.Runner`) serves them all in turn."""
    t0 = time.time()
    with Runner() as runner:
        results = _check_all(opts, live, n_eval, runner)
    manifest.update(opts.run, stages={"check": {"seconds": round(time.time() - t0, 2),
                                                "failed": sorted(n for n, r in results.items() if not r["ok"])}})
    return results


def _check_all(opts: RunOptions, live: bool, n_eval: int, runner: Runner) -> dict[str, dict]:
    from ..evaluate.heldout import eval_set
    from ..evaluate.served import eval_requests
    from ..models import loading
    from ..models.processor import load_processor

    catalog, _ = catalog_of(opts)
    on_gpu = not opts.device.startswith("cpu")
    plans = {}
    for name in catalog.schemes:
        folder = opts.run / "checkpoints" / name
        if not (folder / "config.json").is_file():
            raise FP8MixError(f"{folder} is missing: run fp8mix export --run {opts.run} first")
        plans[name] = read_json(opts.run / "plans" / f"{name}.json", "plan")
    if live and any(on_gpu or plan["fp8_format"] in CPU_FORMATS for plan in plans.values()):
        runner.start()  # vLLM is imported while the checkpoints are checked statically
    _, path = loading.resolve(model_arg(opts))
    net, adapter = loading.build_empty(path)
    layout = adapter.layout(net)
    cache: dict = {}
    extra, engine = None, engine_settings(catalog.settings(next(iter(catalog.schemes)), **overrides(opts)).max_length)
    if live and n_eval and vllm_python() is not None:
        es = eval_set(opts, n_eval, load_processor(path))
        extra, engine = eval_requests(es.samples), engine_settings(es.max_length)

    release_gpu_cache()  # what earlier stages of this process left cached goes to vLLM's engines

    def reference() -> dict:
        if "doc" not in cache:
            cache["doc"] = bf16_reference(opts.run, path, loading.fingerprint(path), engine, extra, runner)
        return cache["doc"]

    results = {}
    for name in progress(list(catalog.schemes), "checking checkpoints (vLLM rules, live vLLM)"):
        folder, plan = opts.run / "checkpoints" / name, plans[name]
        res, served = check_folder(folder, plan, net, adapter, layout, live, on_gpu, reference, extra, engine, runner)
        if served:
            write_served(opts.run, name, served)
        write_json(opts.run / "checks" / f"{name}.json", "check", res)
        results[name] = res
        modelopt = opts.run / "checkpoints" / f"{name}-modelopt"
        if (modelopt / "config.json").is_file():  # `fp8mix export --format modelopt`: vLLM's ModelOpt rules
            static = check_static(modelopt, plan, net, adapter, layout)
            results[modelopt.name] = {"scheme": plan["scheme"], "checkpoint": str(modelopt),
                                      "fp8_format": plan["fp8_format"], "static": static, "ok": static["ok"],
                                      "live": {"ran": False, "ok": None, "reason": "ModelOpt: static check only"}}
            write_json(opts.run / "checks" / f"{modelopt.name}.json", "check", results[modelopt.name])
    return results
