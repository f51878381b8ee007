"""The report's served-speed part, from bench.json (`fp8mix bench` on a GPU): each scheme's vLLM throughput per
workload beside BF16's, next to its quality."""

from __future__ import annotations

WORKLOAD_TITLES = {"prefill_images": "prefill with images (prompt tok/s)",
                   "decode": "small-batch decode (output tok/s)", "mixed": "mixed (total tok/s)",
                   "long_decode": "long-context decode (decode tok/s)"}


def _f(x, spec) -> str:
    return "n/a" if x is None else format(x, spec)


def current(bench: dict | None, keys: dict[str, str | None]) -> dict | None:
    """bench.json as it stands for the run: a row whose `model_key` is not `keys[scheme]` (the key of the run's
    source or of its checkpoint now; check.live.folder_key) measured another model, or one exported since, and is
    stale: not ok, no speed-up. Speed-ups over a stale BF16 row are dropped from every row."""
    if not bench:
        return bench
    rows = []
    for r in bench["rows"]:
        if r.get("ok") and (r.get("model_key") is None or r.get("model_key") != keys.get(r["scheme"])):
            r = {**r, "ok": False, "speedup_vs_bf16": {},
                 "error": "stale: measured on another model or checkpoint than the run's; rerun fp8mix bench"}
        rows.append(r)
    bf16 = next((r for r in rows if r["scheme"] == "bf16"), None)
    if bf16 is None or not bf16.get("ok"):
        rows = [{**r, "speedup_vs_bf16": {}} for r in rows]
    return {**bench, "rows": rows}


def section(bench: dict | None, quality: dict[str, float], schemes: list[str] = ()) -> list[str]:
    """Markdown lines of the "Served speed" section; `quality`: each scheme's reply top-k KL shown beside its speed;
    `schemes`: the run's, each shown as not measured where bench.json has no row for it."""
    L = ["## Served speed (vLLM)\n"]
    if not bench:
        L.append("Not measured: `fp8mix bench --run DIR` on a CUDA GPU with vLLM writes bench.json, and the report "
                 "then shows each scheme's served speed here.\n")
        return L
    names = [w for w in WORKLOAD_TITLES if any(w in r.get("workloads", {}) for r in bench["rows"])]
    dev, engine = bench.get("device") or {}, bench.get("engine") or {}
    graphs = "eager (no CUDA graphs)" if engine.get("enforce_eager") else "CUDA graphs on"
    L.append(f"vLLM {bench.get('vllm_version') or ''} on {engine.get('tensor_parallel_size', 1)}× "
             f"{dev.get('name', 'GPU')}, {graphs}, {bench.get('repeats')} repeats per workload after a warm-up "
             "(median, spread = (max − min) / median); the engine start is timed apart.\n")
    L.append("| scheme | KV cache | " + " | ".join(f"{WORKLOAD_TITLES[w]} | × BF16" for w in names)
             + " | engine start s | reply top-k KL |")
    L.append("|---|---|" + "---|---|" * len(names) + "---|---|")
    measured = {r["scheme"] for r in bench["rows"]}
    missing = [{"scheme": n, "ok": False, "error": "not measured: bench.json has no row for it"}
               for n in ["bf16", *schemes] if n not in measured]
    for r in bench["rows"] + missing:
        if not r.get("ok"):
            empty = " | ".join("—" for _ in range(2 * len(names)))
            L.append(f"| {r['scheme']} | {r.get('kv_cache') or 'bf16'} | {empty} | — | {r.get('error') or 'failed'} |")
            continue
        cells = []
        for w in names:
            m = r["workloads"].get(w, {})
            cells += [f"{_f(m.get('median'), ',.0f')} (±{_f(m.get('spread'), '.1%')})",
                      _f(r.get("speedup_vs_bf16", {}).get(w), '.2f')]
        kl = quality.get(r["scheme"])
        L.append(f"| {r['scheme']} | {r.get('kv_cache_dtype') or r.get('kv_cache') or 'auto'} | " + " | ".join(cells)
                 + f" | {_f(r.get('engine_start_s'), '.0f')} | {_f(kl, '.3g')} |")
    L.append("")
    return L


def points(bench: dict | None, quality: dict[str, float], workload: str = "mixed") -> dict[str, tuple[float, float]]:
    """scheme -> (speed-up over BF16 on `workload`, quality figure), for the schemes that have both."""
    if not bench:
        return {}
    out = {}
    for r in bench["rows"]:
        x = r.get("speedup_vs_bf16", {}).get(workload)
        if r.get("ok") and x is not None and r["scheme"] in quality and r["scheme"] != "bf16":
            out[r["scheme"]] = (x, quality[r["scheme"]])
    return out
