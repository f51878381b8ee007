"""`fp8mix bench`: served speed of the BF16 source and of every checkpoint of a run, in vLLM on a CUDA GPU.

Each model is served by its own engine (``runner.py`` under vLLM's interpreter, a clean GPU each) with CUDA graphs
and torch.compile on (vLLM's defaults; the capture sizes bounded by ``ENGINE``) and the same workloads: prefill
with images, small-batch decode, mixed, long-context decode (its prefill timed apart). Every workload runs
``repeats`` times after a warm-up, each repeat with requests of its own; bench.json keeps every repeat, the median,
min, max and relative spread, and each scheme's median over BF16's. The engine start is timed apart and never
counted in a workload.

bench.json (``fp8mix/bench/v1``, written atomically)::

    {"schema", "run", "device", "vllm_version", "engine", "workloads", "repeats",
     "rows": [{"scheme", "model", "model_key", "kv_cache", "ok", "error", "engine_start_s", "import_s",
               "kv_cache_dtype", "kv_cache_tokens",
               "workloads": {name: {"metric", "median", "min", "max", "spread", "values", "seconds",
                                    "requests", "prompt_tokens", "output_tokens"}},
               "speedup_vs_bf16": {name: float}}]}
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import time
from pathlib import Path

from ..errors import FP8MixError
from ..rundir import read_json, write_json

RUNNER = Path(__file__).with_name("runner.py")
BENCH_VERSION = 1
# Engine settings of every model. enforce_eager False: CUDA graphs (and torch.compile) on; capture sizes bounded
# so that an engine starts in about a minute; prefix caching off so that no repeat reuses a previous one's cache.
ENGINE = {"dtype": "bfloat16", "max_model_len": 4096, "gpu_memory_utilization": 0.85, "enforce_eager": False,
          "enable_prefix_caching": False, "max_num_seqs": 256, "limit_mm_per_prompt": {"image": 1, "video": 0},
          "seed": 0, "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128,
                                                                        160, 192, 224, 256]}}
# metric: which tokens per second a workload reports (prompt, output or both)
# sized so that one model's three workloads x 3 repeats take well under a minute on an H200 at the 3B architecture
WORKLOADS = {
    "prefill_images": {"n": 64, "in_tokens": 512, "images": 1.0, "image_px": 448, "max_tokens": 1,
                       "metric": "prompt_tok_s"},
    "decode": {"n": 8, "in_tokens": 128, "max_tokens": 256, "images": 0.0, "metric": "output_tok_s"},
    "mixed": {"n": 128, "in_tokens": 1024, "max_tokens": 256, "images": 0.25, "image_px": 448,
              "metric": "total_tok_s"},
    # many long sequences decoding together: each step reads every sequence's keys and values (128 x ~2.3 k tokens,
    # ~11 GB in BF16 at 3B) besides the weights, so this is where an FP8 KV cache shows; the prefill is timed apart
    "long_decode": {"n": 128, "in_tokens": 2048, "max_tokens": 512, "images": 0.0, "decode_only": True,
                    "metric": "output_tok_s"},
}
WARMUP = {"n": 16, "in_tokens": 256, "max_tokens": 16, "images": 0.25, "image_px": 448}
KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")


def summarize(runs: list[dict], metric: str) -> dict:
    """The repeats of one workload: tokens/s per repeat by `metric`, their median, min, max and spread
    ((max - min) / median)."""
    if not runs:
        raise FP8MixError("a workload without a single timed repeat")
    toks = {"prompt_tok_s": lambda r: r["prompt_tokens"], "output_tok_s": lambda r: r["output_tokens"],
            "total_tok_s": lambda r: r["prompt_tokens"] + r["output_tokens"]}[metric]
    values = [toks(r) / r["seconds"] for r in runs]
    med = statistics.median(values)
    return {"metric": metric, "median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else None, "values": values,
            "seconds": [r["seconds"] for r in runs], "requests": runs[0]["requests"],
            "prompt_tokens": runs[0]["prompt_tokens"], "output_tokens": runs[0]["output_tokens"]}


def row_of(label: str, model: Path, result: dict, workloads: dict, log: str = "", kv_cache: str | None = None
           ) -> dict:
    """bench.json's row of one model from the runner's result (and its log, for vLLM's KV-cache size)."""
    m = KV_TOKENS.findall(log)
    row = {"scheme": label, "model": str(model), "kv_cache": kv_cache, "ok": bool(result.get("ok")),
           "error": result.get("error"), "engine_start_s": result.get("engine_start_s"),
           "import_s": result.get("import_s"), "kv_cache_dtype": result.get("kv_cache_dtype"),
           "kv_cache_tokens": int(m[-1].replace(",", "")) if m else None, "workloads": {}}
    for name, runs in (result.get("workloads") or {}).items():
        row["workloads"][name] = summarize(runs, workloads[name]["metric"])
    return row


def add_speedups(rows: list[dict]) -> None:
    """Each row's median over the BF16 row's, per workload (none without a measured BF16 row)."""
    base = next((r for r in rows if r["scheme"] == "bf16" and r["ok"]), None)
    for r in rows:
        r["speedup_vs_bf16"] = {} if base is None else {
            w: s["median"] / base["workloads"][w]["median"] for w, s in r["workloads"].items()
            if w in base["workloads"] and base["workloads"][w]["median"]}


def decode_apart_is_timed_right(label: str, engine: dict, workloads: dict) -> None:
    """A decode_only workload serves its requests twice and subtracts the first call (the prefill) from the second:
    with vLLM's prefix cache on (its default) or an image in a request, the second call's prefill is a cache hit,
    the subtraction takes too much off and the decode figure comes out too fast."""
    for name, w in workloads.items():
        if not w.get("decode_only"):
            continue
        if engine.get("enable_prefix_caching", True):
            raise FP8MixError(f"{label}: workload {name} times the decode apart from the prefill, which needs "
                              "enable_prefix_caching False (vLLM's prefix cache would serve the second prefill)")
        if float(w.get("images", 0.0)):
            raise FP8MixError(f"{label}: workload {name} times the decode apart from the prefill, which needs "
                              "text-only requests (vLLM's image cache would serve the second prefill's images)")


def serve_one(py: str, label: str, model: Path, engine: dict, workloads: dict, repeats: int, work: Path,
              timeout: int, warmup: dict = WARMUP) -> tuple[dict, str]:
    """One engine start and the workloads, in a child process. Returns (the runner's result, its log)."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {"label": label, "model": str(model), "out": str(work / f"{label}.result.json"), "engine": engine,
            "workloads": {k: {x: v for x, v in w.items() if x != "metric"} for k, w in workloads.items()},
            "repeats": repeats, "warmup": warmup, "seed": 0}
    spec_path = work / f"{label}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    out = Path(spec["out"])
    out.unlink(missing_ok=True)
    # a session of its own: vLLM's engine core and workers are processes of their own that outlive a killed
    # runner and keep the GPU, so the whole group ends with the runner (or its timeout)
    proc = subprocess.Popen([py, str(RUNNER), str(spec_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    late = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        late = proc.poll() is None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if not proc.stdout.closed:   # after a timeout: what it wrote until then
        stdout, stderr = proc.communicate()
    log = stdout + stderr
    (work / f"{label}.log").write_text(log)
    if late:
        return {"ok": False, "error": f"vLLM did not finish within {timeout} s"}, log
    if not out.is_file():
        tail = " | ".join(log.strip().splitlines()[-3:])
        return {"ok": False, "error": f"the runner exited {proc.returncode}: {tail}"[:2000]}, log
    return json.loads(out.read_text()), log


def bench_models(models: dict[str, dict], out: Path, *, py: str, repeats: int = 3, engine: dict | None = None,
                 workloads: dict | None = None, timeout: int = 1200, time_budget: float | None = None,
                 meta: dict | None = None, progress=None, warmup: dict | None = None) -> dict:
    """Serve each model ({label: {"path", "engine" (extra LLM arguments), "kv_cache", "key" (what identifies the
    model: check.live.folder_key, recorded as the row's model_key)}}) once and write bench.json
    at `out` after every model (a later failure keeps what was measured). `time_budget` (seconds): start no model
    once that much time has passed; it is recorded as not run. `warmup`: the untimed first call (default WARMUP)."""
    if repeats < 3:
        raise FP8MixError(f"--repeats {repeats}: a median and a spread need at least 3 repeats")
    engine = {**ENGINE, **(engine or {})}
    workloads = workloads or WORKLOADS
    warmup = warmup or WARMUP
    for label, m in models.items():
        decode_apart_is_timed_right(label, {**engine, **m.get("engine", {})}, workloads)
    t0 = time.time()
    rows: list[dict] = []
    doc = {"run": None, "engine": engine, "workloads": workloads, "repeats": repeats, "warmup": warmup,
           "vllm_version": None, **(meta or {}), "rows": rows}
    labels = list(models)
    it = progress(labels, f"benchmarking {len(labels)} model(s) in vLLM") if progress else labels
    work = Path(out).parent / "bench"   # each model's spec, result and vLLM log
    for label in it:
        m = models[label]
        if time_budget is not None and time.time() - t0 > time_budget:
            rows.append({"scheme": label, "model": str(m["path"]), "kv_cache": m.get("kv_cache"), "ok": False,
                         "error": f"not run: the time budget of {time_budget:.0f} s was spent", "workloads": {}})
        else:
            result, log = serve_one(py, label, Path(m["path"]), {**engine, **m.get("engine", {})}, workloads,
                                    repeats, work, timeout, warmup)
            rows.append(row_of(label, Path(m["path"]), result, workloads, log, m.get("kv_cache")))
            doc["vllm_version"] = doc["vllm_version"] or result.get("vllm_version")
        rows[-1]["model_key"] = m.get("key")
        add_speedups(rows)
        write_json(out, "bench", doc, version=BENCH_VERSION)
    return doc


def device_facts() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "count": torch.cuda.device_count(), "memory_gib": round(props.total_memory / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda}


def require_gpu_and_vllm() -> str:
    """vLLM's interpreter, once a CUDA GPU is known to be here; one clear error otherwise."""
    import torch

    from ..check.live import vllm_python

    if not torch.cuda.is_available():
        raise FP8MixError("fp8mix bench measures served speed on a CUDA GPU with vLLM; no CUDA device is visible "
                          "here (use fp8mix check/eval for quality on CPU)")
    py = vllm_python()
    if py is None:
        raise FP8MixError("fp8mix bench needs vLLM: it is not importable here and .venv-vllm is missing "
                          "(or set FP8MIX_VLLM_PYTHON)")
    return py


def stage_bench(opts, repeats: int = 3, schemes: list[str] | None = None, time_budget: float | None = None,
                timeout: int = 1200) -> dict:
    """Benchmark the run's BF16 source and every exported compressed-tensors checkpoint; writes bench.json."""
    from ..check.live import folder_key
    from ..context import catalog_of, model_arg, progress, require_run
    from ..models import loading

    py = require_gpu_and_vllm()
    require_run(opts.run)
    catalog, _ = catalog_of(opts)
    _, source = loading.resolve(model_arg(opts))
    names = schemes or list(catalog.schemes)
    unknown = [n for n in names if n != "bf16" and n not in catalog.schemes]
    if unknown:
        raise FP8MixError(f"unknown scheme {unknown[0]!r}; the catalog has {', '.join(catalog.schemes)}")
    models = {"bf16": {"path": source, "key": folder_key(source)}} if schemes is None or "bf16" in names else {}
    for n in (x for x in names if x != "bf16"):
        folder = opts.run / "checkpoints" / n
        if not (folder / "config.json").is_file():
            raise FP8MixError(f"{folder} is missing: run fp8mix export --run {opts.run} first")
        plan = read_json(opts.run / "plans" / f"{n}.json", "plan")
        models[n] = {"path": folder, "kv_cache": plan.get("kv_cache"), "key": folder_key(folder)}
    return bench_models(models, opts.run / "bench.json", py=py, repeats=repeats, time_budget=time_budget,
                        timeout=timeout, meta={"run": str(opts.run), "device": device_facts()}, progress=progress)
