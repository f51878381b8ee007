#!/usr/bin/env python3
"""GPU benchmark: served speed of BF16 and of every catalog scheme at the Qwen2.5-VL-3B architecture, through
fp8mix bench's own engine runner (``src/fp8mix/bench/runner.py``) and bench.json format.

Run on a CUDA machine where vLLM is importable, from the repository root::

    PYTHONPATH=/tmp/site:src python3 benchmarks/bench_served.py --out OUT/bench_served.json [--time-budget 540]

Model folders as in ``bench_vllm.py`` (whose helpers this reuses): the 3B architecture's config.json with the
embedded tokenizer, ``load_format="dummy"`` (random weights: speed does not depend on the values), each scheme's
config.json carrying fp8mix's own ``quantization_config(plan)`` of a plan made by fp8mix's planner from a synthetic
sensitivity (middle blocks least sensitive). The FP8 KV-cache scheme's config declares the ``kv_cache_scheme``, so
vLLM runs an fp8_e4m3 cache; its k/v scales are dummy values (speed does not depend on them either).

Engines: one per model, sequentially, each in its own process, CUDA graphs and torch.compile on, the same settings
and workloads as ``fp8mix bench`` (``fp8mix.bench.stage.ENGINE``/``WORKLOADS``), 3 repeats after a warm-up. The
order puts the goal schemes first (bf16, full, full_kv); ``--time-budget`` starts no engine after that many seconds
(the rest are recorded as not run; ``--schemes`` measures them in another call, bf16 included for the ratios).

Why small-batch decode gains little: ``--decode-sweep`` adds decode at 1, 64 and 256 requests (128 tokens in, 128
out) to every model, so each scheme's time per decode step is seen from launch-bound to GEMM-bound in the same
engine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

ORDER = ("bf16", "fp8_autoquant_full", "fp8_autoquant_full_kv", "fp8_autoquant_top50", "fp8_autoquant_bits12",
         "fp8_autoquant_bits10", "fp8_autoquant_top25")


def model_folders(work: Path, schemes: list[str]) -> dict[str, dict]:
    """{label: {"path", "engine", "kv_cache"}} for bench_models: dummy-weight folders of the 3B architecture."""
    from bench_vllm import synthetic_sensitivity, write_model_dir

    from fp8mix.export.compressed_tensors import quantization_config
    from fp8mix.models import loading
    from fp8mix.plan.catalog import load_catalog
    from fp8mix.plan.planner import plan_scheme

    base = write_model_dir(work / "models" / "bf16")
    net, adapter = loading.build_empty(base)
    layout = adapter.layout(net)
    catalog, _ = load_catalog()
    sens = {**synthetic_sensitivity(layout), "model_layout": adapter.plan_facts(net)}
    for g in sens["groups"]:
        g["modules"] = list(layout.group(g["name"]).modules)
    dummy = {"load_format": "dummy"}
    out = {}
    for name in schemes:
        if name == "bf16":
            out[name] = {"path": base, "engine": dummy}
            continue
        plan = plan_scheme(name, catalog, sens)
        out[name] = {"path": write_model_dir(work / "models" / name, quantization_config(plan)), "engine": dummy,
                     "kv_cache": plan.get("kv_cache")}
    return out


# decode at other batch sizes (same prompts' length as "decode"); output tok/s / requests = decode steps per second
DECODE_SWEEP = {f"decode_b{n}": {"n": n, "in_tokens": 128, "max_tokens": 128, "images": 0.0,
                                 "metric": "output_tok_s"} for n in (1, 64, 256)}


def workloads_of(decode_sweep: bool) -> dict:
    from fp8mix.bench.stage import WORKLOADS

    return {**WORKLOADS, **(DECODE_SWEEP if decode_sweep else {})}


def step_table(doc: dict) -> str:
    """Milliseconds per decode step of each model at each decode batch (all requests decode together)."""
    names = [w for w in doc["workloads"] if w.startswith("decode")]
    lines = ["model                     " + "".join(f"{w + ' ms/step':>22s}" for w in names)]
    for r in doc["rows"]:
        cells = []
        for w in names:
            s = r["workloads"].get(w)
            if not s:
                cells.append(f"{'-':>22s}")
                continue
            steps = s["output_tokens"] / s["requests"]
            ms = 1000 * statistics.median(s["seconds"]) / steps
            cells.append(f"{ms:10.2f} (x{r['speedup_vs_bf16'].get(w, float('nan')):.2f})".rjust(22))
        lines.append(f"{r['scheme']:26s}" + "".join(cells))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="bench.json to write (fp8mix/bench/v1)")
    ap.add_argument("--work", default="/tmp/fp8mix-bench-served", help="model folders and engine logs")
    ap.add_argument("--schemes", default=",".join(ORDER), help="comma-separated, in order (bf16 = the source)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--time-budget", type=float, default=None, help="start no engine after this many seconds")
    ap.add_argument("--timeout", type=int, default=420, help="seconds one engine may take, start included")
    ap.add_argument("--decode-sweep", action="store_true", help="also decode at 1, 64 and 256 requests")
    args = ap.parse_args()

    from fp8mix.bench.stage import bench_models, device_facts, require_gpu_and_vllm
    from fp8mix.errors import FP8MixError

    try:
        require_gpu_and_vllm()
    except FP8MixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.time()
    work = Path(args.work)
    models = model_folders(work, [s for s in args.schemes.split(",") if s])
    out = Path(args.out)
    doc = bench_models(models, out, py=sys.executable, repeats=args.repeats, time_budget=args.time_budget,
                       timeout=args.timeout, workloads=workloads_of(args.decode_sweep),
                       meta={"run": None, "device": device_facts(),
                             "model": "Qwen2.5-VL-3B architecture, dummy weights"})
    for r in doc["rows"]:
        cells = ", ".join(f"{w} {s['median']:.0f} tok/s x{r['speedup_vs_bf16'].get(w, float('nan')):.2f} "
                          f"(spread {s['spread']:.1%})" for w, s in r["workloads"].items())
        print(f"{r['scheme']:24s} start {r.get('engine_start_s') or 0:6.1f} s  kv {r.get('kv_cache_dtype')}  "
              f"{cells or r.get('error')}")
    print(step_table(doc))
    print(f"wrote {out} in {time.time() - t0:.0f} s (engine logs in {out.parent / 'bench'})")
    return 0 if all(r["ok"] for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
