"""The report's served-speed part, from bench.json (`fp8mix bench` on a GPU): each scheme's vLLM throughput per
workload beside BF16's, next to its quality."""

from __future__ import annotations

WORKLOAD_TITLES = {"prefill_images": "prefill with images (prompt tok/s)",
                   "decode": "small-batch decode (output tok/s)", "mixed": "mixed (total tok/s)",
                   "long_decode": "long-context decode (decode tok/s)"}


def _f(x, spec) -> str:
    return "n/a" if x is None else format(x, spec)


def section(bench: dict | None, quality: dict[str, float]) -> list[str]:
    """Markdown lines of the "Served speed" section; `quality`: each scheme's KL figure shown beside its speed."""
    L = ["## Served speed (vLLM)\n"]
    if not bench:
        L.append("Not measured: `fp8mix bench --run DIR` on a CUDA GPU with vLLM writes bench.json, and the report "
                 "then shows each scheme's served speed here.\n")
        return L
    names = [w for w in WORKLOAD_TITLES if any(w in r.get("workloads", {}) for r in bench["rows"])]
    dev = bench.get("device") or {}
    L.append(f"vLLM {bench.get('vllm_version') or ''} on {dev.get('count', 1)}× {dev.get('name', 'GPU')}, CUDA "
             f"graphs on, {bench.get('repeats')} repeats per workload after a warm-up (median, spread = "
             "(max − min) / median); the engine start is timed apart.\n")
    L.append("| scheme | KV cache | " + " | ".join(f"{WORKLOAD_TITLES[w]} | × BF16" for w in names)
             + " | engine start s | mean KL |")
    L.append("|---|---|" + "---|---|" * len(names) + "---|---|")
    for r in bench["rows"]:
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
