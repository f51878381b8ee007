"""Does the served checkpoint compute what the BF16 source computes? The live check's output test.

Probes: a few image and text prompts (the embedded data's shapes questions, a held-out photo, held-out text to
continue). The BF16 source is served by vLLM once per run and its greedy replies, with their teacher-forced
logprobs, are cached in checks/served/bf16.json (keyed by the source's fingerprint, the requests, the runner and
the vLLM version). Each checkpoint's engine then generates the same probes and scores the BF16 replies
teacher-forced; `compare` measures, over every reply position:

- top-1 agreement: the checkpoint's most likely token equals BF16's;
- logprob gap: |log p_BF16(t) - log p_ckpt(t)| for BF16's reply token t (mean and max);
- greedy replies equal to BF16's (reported, not judged: one near-tie flip changes the rest of a reply);
- prompt token ids equal to the source's (judged: a checkpoint with another tokenizer, chat template or image
  processor config fails).

Tolerances, from FP8 noise measured on the embedded model (vLLM 0.32.0 CPU build, 2026-11-30; the figures are in
TOLERANCES' comment) with room for larger models, and a layer with doubled weight scales far outside them.
"""

from __future__ import annotations

from pathlib import Path

from ..data import real, shapes
from ..data.samples import ChatSample
from ..rundir import read_json
from .live import SERVED_DIR, RequestSet, Runner, runner_digest, serve, vllm_python, vllm_version, write_served

PROBE_TOKENS = 16
PROBE_TOP_K = 5
REFERENCE_FILE = SERVED_DIR / "bf16.json"

# Measured on the embedded model (M-RoPE retrain), vLLM 0.32.0 CPU build, 2026-11-30: the 13 probes give 96 reply
# positions; schemes planned from 32 calibration samples; top-1 agreement / mean / max logprob gap (nats):
#   BF16 source served again as if a checkpoint     1.000 / 0      / 0       (vLLM is deterministic here)
#   fp8_autoquant_bits12                             1.000 / 0.0085 / 0.111
#   fp8_autoquant_top25                              0.979 / 0.0100 / 0.064
#   fp8_autoquant_top50                              0.990 / 0.0134 / 0.104
#   fp8_autoquant_bits10                             0.990 / 0.0143 / 0.155
#   fp8_autoquant_full (every LM linear FP8)         0.990 / 0.0411 / 0.402
#   full, weight scales of one layer doubled:
#     layers.0.mlp.down_proj                         0.823 / 0.183  / 1.53
#     layers.3.self_attn.o_proj                      0.865 / 0.170  / 1.44
#     layers.6.self_attn.v_proj                      0.896 / 0.192  / 2.04
#     layers.7.mlp.down_proj                         0.948 / 0.124  / 1.58
# The limits sit between: a mean gap of 0.10 nats is 2.4x the largest FP8 noise (full) and below every doubled
# layer; top-1 agreement 0.90 is 8 points under the lowest FP8 figure. The max gap is reported only (one flat
# position decides it). A larger model's FP8 noise per token is not expected above the tiny model's.
TOLERANCES = {"top1_agreement_min": 0.90, "mean_logprob_gap_max": 0.10}


def probe_samples() -> list[ChatSample]:
    """Image questions (shapes), a held-out photo to describe, held-out text to continue."""
    return ([shapes.sample("check", i) for i in range(8)] + [real.photo_sample("eval", i) for i in range(2)]
            + [real.text_sample("eval", i) for i in range(3)])


def probe_requests(reference: dict | None) -> RequestSet:
    """The probes' requests: BF16 generates and scores its own replies; a checkpoint generates and scores
    BF16's replies (`reference`: BF16's outputs by request id)."""
    req = RequestSet()
    for i, s in enumerate(probe_samples()):
        rid = f"probe/{i}"
        cont = "generated" if reference is None else reference[rid]["token_ids"]
        req.add_reply(rid, s, PROBE_TOKENS, continuation=cont, continuation_logprobs=PROBE_TOP_K)
    return req


def reference_key(fingerprint: str, requests: RequestSet, py: str, engine: dict) -> dict:
    return {"source_fingerprint": fingerprint, "requests": requests.key(), "runner": runner_digest(),
            "vllm": vllm_version(py), "engine": engine}


def bf16_reference(run: Path, source: Path, fingerprint: str, engine: dict, extra: RequestSet | None = None,
                   runner: Runner | None = None) -> dict:
    """vLLM's outputs for the BF16 source on the probes (and `extra` requests), served with `engine`
    (`live.engine_settings`): read from the run's cache when its key matches, else served now (one engine start,
    by `runner` or a process of its own) and cached. Returns the cache document: "key", "extra_key", "ok", "errors",
    "vllm_version", "timings_s", "outputs" (by request id)."""
    requests = probe_requests(None)
    if extra is not None:
        requests.extend(extra)
    py = vllm_python()
    key = reference_key(fingerprint, requests, py, engine) if py else None
    path = run / REFERENCE_FILE
    if path.is_file():
        doc = read_json(path, "served")
        if doc.get("key") == key:
            return doc
    res = (runner.serve if runner is not None else serve)(source, requests, engine=engine)
    doc = {"key": key, "extra_key": extra.key() if extra is not None else None, "model": str(source),
           "model_key": fingerprint,
           "ok": bool(res.get("ok")), "errors": res.get("errors", []),
           "reason": res.get("reason"), "vllm_version": res.get("vllm_version"),
           "timings_s": res.get("timings_s", {}), "outputs": res.get("outputs", {})}
    if doc["ok"]:  # a failed reference is not cached: the next check serves it again
        write_served(run, REFERENCE_FILE.stem, doc)
    return doc


def compare(outputs: dict, reference: dict, tolerances: dict = TOLERANCES) -> dict:
    """The checkpoint's probe outputs against BF16's: metrics, per-probe detail and the errors beyond tolerance."""
    n = agree = equal = 0
    gaps: list[float] = []
    errors, probes = [], {}
    for rid, ref in sorted(reference.items()):
        if not rid.startswith("probe/"):
            continue
        out = outputs.get(rid)
        if out is None or "continuation" not in out or "continuation" not in ref:
            errors.append(f"{rid}: no teacher-forced output from vLLM")
            continue
        if out["prompt_token_ids"] != ref["prompt_token_ids"]:
            errors.append(f"{rid}: the prompt's token ids differ from the BF16 source's "
                          f"({len(out['prompt_token_ids'])} vs {len(ref['prompt_token_ids'])} tokens): tokenizer, "
                          "chat template or image processor config changed")
            continue
        c, rc = out["continuation"], ref["continuation"]
        top_c = [t[0][0] if t else None for t in c["top"]]
        top_r = [t[0][0] if t else None for t in rc["top"]]
        g = [abs(a - b) for a, b in zip(rc["logprobs"], c["logprobs"]) if a is not None and b is not None]
        a = sum(x == y for x, y in zip(top_c, top_r))
        same = out["token_ids"] == ref["token_ids"]
        probes[rid] = {"positions": len(top_r), "top1_agree": a, "max_logprob_gap": max(g, default=0.0),
                       "greedy_equal": same, "text": out["text"], "bf16_text": ref["text"]}
        n, agree, equal = n + len(top_r), agree + a, equal + same
        gaps += g
    metrics = {"positions": n, "top1_agreement": agree / n if n else None,
               "mean_logprob_gap": sum(gaps) / len(gaps) if gaps else None,
               "max_logprob_gap": max(gaps, default=None), "greedy_equal": equal, "probes": len(probes)}
    if n:
        if metrics["top1_agreement"] < tolerances["top1_agreement_min"]:
            errors.append(f"top-1 agreement with the BF16 source {metrics['top1_agreement']:.3f} < "
                          f"{tolerances['top1_agreement_min']} over {n} reply positions (FP8 noise stays above it)")
        if metrics["mean_logprob_gap"] > tolerances["mean_logprob_gap_max"]:
            errors.append(f"mean logprob gap to the BF16 source {metrics['mean_logprob_gap']:.4f} nats > "
                          f"{tolerances['mean_logprob_gap_max']} over {n} reply positions (FP8 noise stays below it)")
    elif not errors:
        errors.append("no probe reply to compare with the BF16 source")
    return {"metrics": metrics, "tolerances": dict(tolerances), "probes": probes, "errors": errors}
