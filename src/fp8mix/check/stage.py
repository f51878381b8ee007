"""`fp8mix check`: the static vLLM rule check of every exported checkpoint, then the live vLLM check where vLLM
is importable."""

from __future__ import annotations

import time
from pathlib import Path

from .. import manifest
from ..errors import FP8MixError
from ..pipeline import RunOptions, catalog_of, progress, _model_arg
from ..rundir import read_json, write_json
from .live import CPU_FORMATS, run_live
from .static import check_static


def check_folder(folder: Path, plan: dict, net, adapter, layout, live: bool, on_gpu: bool) -> dict:
    static = check_static(folder, plan, net, adapter, layout)
    result = {"scheme": plan["scheme"], "checkpoint": str(folder), "fp8_format": plan["fp8_format"],
              "static": static}
    if not live:
        result["live"] = {"ran": False, "ok": None, "reason": "skipped (--no-live)"}
    elif not static["ok"]:
        result["live"] = {"ran": False, "ok": None, "reason": "skipped: the static check failed"}
    elif not on_gpu and plan["fp8_format"] not in CPU_FORMATS:
        result["live"] = {"ran": False, "ok": None,
                          "reason": f"vLLM's CPU build has no kernels for {plan['fp8_format']}; static check only"}
    else:
        fp8 = [adapter.to_disk(m) for m in plan["fp8_modules"]]
        bf16 = [adapter.to_disk(m) for m in plan["bf16_modules"]]
        result["live"] = run_live(folder, fp8, bf16)
    result["ok"] = static["ok"] and result["live"]["ok"] is not False
    return result


def stage_check(opts: RunOptions, live: bool = True) -> dict[str, dict]:
    from ..models import loading

    t0 = time.time()
    catalog, _ = catalog_of(opts)
    _, path = loading.resolve(_model_arg(opts))
    net, adapter = loading.build_empty(path)
    layout = adapter.layout(net)
    results = {}
    for name in progress(list(catalog.schemes), "checking checkpoints (vLLM rules, live vLLM)"):
        folder = opts.run / "checkpoints" / name
        if not (folder / "config.json").is_file():
            raise FP8MixError(f"{folder} is missing: run fp8mix export --run {opts.run} first")
        plan = read_json(opts.run / "plans" / f"{name}.json", "plan")
        res = check_folder(folder, plan, net, adapter, layout, live, not opts.device.startswith("cpu"))
        write_json(opts.run / "checks" / f"{name}.json", "check", res)
        results[name] = res
    manifest.update(opts.run, stages={"check": {"seconds": round(time.time() - t0, 2),
                                                "failed": sorted(n for n, r in results.items() if not r["ok"])}})
    return results
