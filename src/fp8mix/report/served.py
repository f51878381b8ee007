"""The report's served-quality part: each scheme as fp8mix emulates it beside the same scheme as vLLM serves it,
and a flag where the two depart beyond the noise between the engines.

Both sides are measured against BF16 on their own engine (emulated scheme vs BF16 in transformers, served scheme
vs BF16 served by vLLM), on the same samples, prompt tokens and positions, with the same top-k KL. The noise
between the engines (measured on the embedded model, DEPARTURE's comment) is what vLLM's kernels add on top of
FP8: a served figure beyond it means the checkpoint is not served as it was evaluated (a wrong scale, a layer
loaded in another format, a kernel that quantizes differently).
"""

from __future__ import annotations

# The noise between the engines, measured on the embedded model (64 held-out samples, every default scheme; vLLM
# 0.32.0 CPU build and vLLM 0.26.0 on an H200, 2026-11-30; tables in BENCHMARKS.md, "Served vs emulated"): served
# reply top-1 agreement at most 0.0105 below the emulated one, served reply top-k KL at most 1.24x the emulated one.
# A scheme departs when served is worse than emulated beyond either bound; one layer's weight scales doubled does.
DEPARTURE = {
    "top1_reply_drop": 0.02,     # served reply top-1 agreement below the emulated one by more than this
    "kl_ratio": 2.0,             # served reply top-k KL above this multiple of the emulated one ...
    "kl_floor": 0.002,           # ... plus this (nats; an absolute margin for schemes near BF16)
}


def pairs(emulated: dict[str, dict], served: dict[str, dict]) -> dict[str, tuple[dict, dict]]:
    """Schemes (not BF16) with both an emulated and a served row (an eval of vLLM only has no emulated row: the
    report's rows are then the served ones)."""
    return {n: (emulated[n], s) for n, s in served.items()
            if n != "bf16" and n in emulated and emulated[n].get("engine") != "vllm" and s.get("served")
            and "kl_topk_reply_mean" in emulated[n]}


def departures(emulated: dict, served: dict) -> list[str]:
    """Why `served` departs from `emulated` beyond the engines' noise (empty: it does not)."""
    why = []
    drop = emulated["top1_reply_agreement"] - served["top1_reply_agreement"]
    if drop > DEPARTURE["top1_reply_drop"]:
        why.append(f"reply top-1 agreement {served['top1_reply_agreement']:.4f} served vs "
                   f"{emulated['top1_reply_agreement']:.4f} emulated")
    limit = DEPARTURE["kl_ratio"] * emulated["kl_topk_reply_mean"] + DEPARTURE["kl_floor"]
    if served["kl_topk_reply_mean"] > limit:
        why.append(f"reply top-k KL {served['kl_topk_reply_mean']:.3g} served vs {emulated['kl_topk_reply_mean']:.3g} "
                   f"emulated (limit {limit:.3g})")
    return why


def _f(x, spec=".3g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def section(emulated: dict[str, dict], served: dict[str, dict], top_k: int, figure: str | None) -> list[str]:
    """Markdown lines of the "Served quality" section."""
    L = ["## Served quality: emulated vs vLLM\n"]
    if not served:
        L.append("Not measured: vLLM was not available to the eval (`fp8mix eval --engine vllm` where vLLM is "
                 "importable; `make vllm-env` builds vLLM's CPU build).\n")
        return L
    version = next((r.get("vllm_version") for r in served.values() if r.get("vllm_version")), None)
    L.append(f"Each scheme's checkpoint served by vLLM {version or ''} and compared with the BF16 source served by "
             "vLLM, on the same held-out samples as the emulation (same prompt tokens, checked; same positions). "
             f"KL is the top-{top_k} KL on both sides: each position's distribution coarse-grained onto the tokens in "
             "both models' top-k plus the actual token, the rest merged into one bucket; merging outcomes never "
             "increases a KL, so it is a lower bound of the full KL (the emulated full KL is in the table above).\n")
    L.append("| scheme | emulated reply top-k KL | served reply top-k KL | emulated reply top-1 | served reply top-1 | "
             "emulated answer acc. | served answer acc. | emulated flips | served flips | served tokens/s | "
             "served = emulated? |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in served.items():
        e = emulated.get(name, {})
        if e.get("engine") == "vllm":  # an eval of vLLM only: nothing emulated to compare with
            e = {}
        if not s.get("served"):
            L.append(f"| {name} | {_f(e.get('kl_topk_reply_mean'))} | — | {_f(e.get('top1_reply_agreement'), '.4f')} "
                     f"| — | {_f(e.get('answer_accuracy'), '.3f')} | — | {e.get('flips_vs_bf16', 'n/a')} "
                     "| — | — | "
                     f"{s.get('error') or s.get('reason')} |")
            continue
        verdict = "—" if name == "bf16" or not e else (
            "**DEPARTS**: " + "; ".join(departures(e, s)) if departures(e, s) else "yes, within noise")
        L.append(f"| {name} | {_f(e.get('kl_topk_reply_mean'))} | {_f(s['kl_topk_reply_mean'])} | "
                 f"{_f(e.get('top1_reply_agreement'), '.4f')} | {_f(s['top1_reply_agreement'], '.4f')} | "
                 f"{_f(e.get('answer_accuracy'), '.3f')} | {_f(s['answer_accuracy'], '.3f')} | "
                 f"{e.get('flips_vs_bf16', 'n/a')} | {s['flips_vs_bf16']} | {_f(s.get('tokens_per_s'), '.0f')} | "
                 f"{verdict} |")
    L.append("")
    L.append(f"A scheme departs when served is worse than emulated beyond the noise between the engines: reply top-1 "
             f"agreement lower by more than {DEPARTURE['top1_reply_drop']}, or reply top-k KL above "
             f"{DEPARTURE['kl_ratio']:g}× the emulated one + {DEPARTURE['kl_floor']:g} nats. Flips count answers that "
             "differ from BF16's on the same engine. Tokens/s: every token the engine prefilled or generated per "
             "second of its serve call, in eager mode (not a speed figure).\n")
    if figure:
        L.append(f"![Served vs emulated quality]({figure})\n")
    return L


def flagged(emulated: dict[str, dict], served: dict[str, dict]) -> dict[str, list[str]]:
    """The schemes whose served quality departs from their emulation, with the reasons."""
    return {n: departures(e, s) for n, (e, s) in pairs(emulated, served).items() if departures(e, s)}
