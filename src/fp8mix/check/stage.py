"""`fp8mix check`: the static vLLM rule check of every exported checkpoint, then the live vLLM check where vLLM
is importable: each checkpoint served once, its layers inspected, its outputs compared with the BF16 source served
by vLLM (see fidelity.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .. import manifest
from ..errors import FP8MixError
from ..context import RunOptions, catalog_of, progress, model_arg
from ..rundir import read_json, write_json
from .fidelity import bf16_reference, compare, probe_requests
from .live import CPU_FORMATS, RequestSet, serve
from .static import check_static

SERVED_DIR = Path("checks") / "served"


def live_check(folder: Path, plan: dict, adapter, reference: dict,
               extra: RequestSet | None = None) -> tuple[dict, dict]:
    """Serve one checkpoint (one engine start): layer dtypes, load warnings, outputs against the BF16 reference.
    Returns (the live verdict, every served output by request id)."""
    fp8 = [adapter.to_disk(m) for m in plan["fp8_modules"]]
    bf16 = [adapter.to_disk(m) for m in plan["bf16_modules"]]
    ref_ok = reference.get("ok")
    requests = probe_requests(reference["outputs"] if ref_ok else None)
    if extra is not None:
        requests.extend(extra)
    res = serve(folder, requests, fp8, bf16)
    if not res["ran"]:
        return {"ran": False, "ok": None, "reason": res["reason"]}, {}
    errors = list(res.get("errors", []))
    live = {"ran": True, "vllm_version": res.get("vllm_version"), "warnings": res.get("warnings", [])[:20],
            "layers": res.get("layers", {}), "timings_s": res.get("timings_s", {})}
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
    return live, res.get("outputs", {})


def check_folder(folder: Path, plan: dict, net, adapter, layout, live: bool, on_gpu: bool,
                 reference: Callable[[], dict] | None = None, extra: RequestSet | None = None) -> tuple[dict, dict]:
    """The static check, then (when `live` and the format runs here) the live check against `reference()`, the
    BF16 source's served outputs. Returns (the verdict, the served outputs by request id)."""
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
    elif reference is None:
        raise FP8MixError("the live check needs the BF16 source's served outputs")
    else:
        result["live"], outputs = live_check(folder, plan, adapter, reference(), extra)
    result["ok"] = static["ok"] and result["live"]["ok"] is not False
    return result, outputs


def stage_check(opts: RunOptions, live: bool = True, extra: RequestSet | None = None) -> dict[str, dict]:
    """Check every scheme's checkpoint. `extra`: requests served on the same engines as the live check, the BF16
    source's included (a served evaluation: `fidelity.sample_requests`); every engine's outputs are written to
    checks/served/<name>.json (`served_outputs` reads them)."""
    from ..models import loading

    t0 = time.time()
    catalog, _ = catalog_of(opts)
    _, path = loading.resolve(model_arg(opts))
    net, adapter = loading.build_empty(path)
    layout = adapter.layout(net)
    cache: dict = {}

    def reference() -> dict:
        if "doc" not in cache:
            cache["doc"] = bf16_reference(opts.run, path, loading.fingerprint(path), extra)
        return cache["doc"]

    results = {}
    for name in progress(list(catalog.schemes), "checking checkpoints (vLLM rules, live vLLM)"):
        folder = opts.run / "checkpoints" / name
        if not (folder / "config.json").is_file():
            raise FP8MixError(f"{folder} is missing: run fp8mix export --run {opts.run} first")
        plan = read_json(opts.run / "plans" / f"{name}.json", "plan")
        res, outputs = check_folder(folder, plan, net, adapter, layout, live, not opts.device.startswith("cpu"),
                                    reference, extra)
        if outputs:
            write_json(opts.run / SERVED_DIR / f"{name}.json", "served",
                       {"model": str(folder), "vllm_version": res["live"].get("vllm_version"), "outputs": outputs})
        write_json(opts.run / "checks" / f"{name}.json", "check", res)
        results[name] = res
    manifest.update(opts.run, stages={"check": {"seconds": round(time.time() - t0, 2),
                                                "failed": sorted(n for n, r in results.items() if not r["ok"])}})
    return results


def served_outputs(run: Path, name: str) -> dict:
    """The outputs vLLM served for `name` ("bf16" for the source) in the last check, by request id."""
    return read_json(run / SERVED_DIR / f"{name}.json", "served", "run fp8mix check with vLLM first")["outputs"]
