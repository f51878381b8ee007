#!/usr/bin/env python3
"""Served speed of one model folder in vLLM: one engine start, then timed workloads. A standalone script run by an
interpreter where vLLM is importable (fp8mix's bench stage starts it once per model: each engine on a clean GPU).

    python runner.py SPEC.json

SPEC.json: {"label", "model" (folder), "out" (result JSON path), "engine" (LLM keyword arguments), "workloads"
({name: {"n", "in_tokens", "max_tokens", "images" (share of requests with one image), "image_px", "decode_only"}}),
"repeats", "warmup" (a workload spec), "seed"}.

Prompts are Qwen-VL chat prompts (``<|vision_start|><|image_pad|><|vision_end|>`` for an image) around random
ordinary tokens of the model's tokenizer, fixed by the seed, the same for every model; images are random-noise
RGB squares. Every repeat gets requests of its own (same sizes, new tokens and images): vLLM keeps processed images
in a cache keyed by their content, so repeating the same images would time cache hits, not the image path a server
runs for new images. Greedy, ``ignore_eos`` (every request produces exactly max_tokens), no detokenization. Each
workload is one ``LLM.generate`` call of all its requests, timed by wall clock; the first call after the engine
start is a warm-up and not counted. A ``decode_only`` workload times the decode apart from the prefill: the same
requests are served once with one output token (the prefill, prefix caching off) and once in full, and the
difference is its time for the remaining output tokens. The engine start (``LLM(...)``) and the vLLM import are
timed apart.

Writes {"label", "ok", "error", "vllm_version", "torch_version", "import_s", "engine_start_s", "kv_cache_dtype"
(what the attention layers run with), 
"workloads": {name: [{"seconds", "requests", "prompt_tokens", "output_tokens"(, "prefill_seconds")}, ...one per
repeat]}} (decode_only: seconds and output_tokens of the decode alone).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import zlib
from pathlib import Path

IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"


def ordinary_ids(tokenizer, limit: int = 30000) -> list[int]:
    """Token ids that are not special (prompts of random ordinary tokens)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = set((getattr(tokenizer, "get_added_vocab", lambda: {})() or {}).values())
    n = min(len(tokenizer), limit)
    return [i for i in range(n) if i not in special and i not in added]


def make_requests(tokenizer, spec: dict, rng, ids: list[int]) -> list[dict]:
    """The requests of one workload: `n` prompts of `in_tokens` random ordinary tokens; a share `images` of them
    with one `image_px` square image in the Qwen-VL chat format (the text then decoded from the tokens)."""
    import numpy as np
    from PIL import Image

    n, length = int(spec["n"]), int(spec["in_tokens"])
    with_image = int(round(n * float(spec.get("images", 0.0))))
    out = []
    for i in range(n):
        toks = [ids[int(j)] for j in rng.integers(0, len(ids), length)]
        if i < with_image:
            px = int(spec.get("image_px", 448))
            img = Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8))
            text = tokenizer.decode(toks)
            out.append({"prompt": IMAGE_PROMPT.format(text=text), "multi_modal_data": {"image": img}})
        else:
            out.append({"prompt_token_ids": toks})
    return out


def timed(llm, requests: list[dict], max_tokens: int) -> dict:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True, detokenize=False, seed=0)
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(requests, sp, use_tqdm=False)
    sync()
    dt = time.perf_counter() - t0
    return {"seconds": dt, "requests": len(outs),
            "prompt_tokens": sum(len(o.prompt_token_ids or []) for o in outs),
            "output_tokens": sum(len(c.token_ids) for o in outs for c in o.outputs)}


def timed_decode(llm, requests: list[dict], max_tokens: int) -> dict:
    """The decode of `requests` apart from their prefill: the prefill alone (one output token) subtracted from the
    whole (prefix caching is off, so the second call prefills again)."""
    pre = timed(llm, requests, 1)
    full = timed(llm, requests, max_tokens)
    return {"seconds": full["seconds"] - pre["seconds"], "prefill_seconds": pre["seconds"],
            "requests": full["requests"], "prompt_tokens": full["prompt_tokens"],
            "output_tokens": full["output_tokens"] - full["requests"]}


# where a Qwen-VL model keeps its first LM attention layer in vLLM (an attrgetter pickles by value into the worker)
FIRST_ATTENTION = "language_model.model.layers.0.self_attn.attn.kv_cache_dtype"


def served_kv_cache_dtype(llm) -> str | None:
    """The KV-cache dtype the LM attention runs with, read in vLLM's worker ("auto" = the model dtype; a
    checkpoint's kv_cache_scheme turns auto into fp8 inside the worker, so the front end's config cannot tell)."""
    import operator

    try:
        found = set(llm.apply_model(operator.attrgetter(FIRST_ATTENTION)))
    except Exception as exc:  # another model layout, or a vLLM without apply_model: say so rather than guess
        return f"unknown ({type(exc).__name__}: {str(exc)[:200]})"
    return ",".join(sorted(map(str, found))) or None


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(spec: dict) -> dict:
    res: dict = {"label": spec["label"], "ok": False, "error": None, "workloads": {}}
    t0 = time.perf_counter()
    try:
        import numpy as np
        import torch
        import vllm
        from vllm import LLM

        res["vllm_version"], res["torch_version"] = vllm.__version__, torch.__version__
        res["import_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        llm = LLM(model=spec["model"], **spec["engine"])
        res["engine_start_s"] = time.perf_counter() - t1
        res["kv_cache_dtype"] = served_kv_cache_dtype(llm)
        tok = llm.get_tokenizer()
        ids = ordinary_ids(tok)
        rng = np.random.default_rng(int(spec.get("seed", 0)))
        warm = spec["warmup"]
        timed(llm, make_requests(tok, warm, rng, ids), warm["max_tokens"])
        for name, w in spec["workloads"].items():
            runs = []
            for rep in range(int(spec["repeats"])):
                rng = np.random.default_rng([int(spec.get("seed", 0)), zlib.crc32(name.encode()), rep])
                requests = make_requests(tok, w, rng, ids)
                runs.append((timed_decode if w.get("decode_only") else timed)(llm, requests, w["max_tokens"]))
            res["workloads"][name] = runs
        res["ok"] = True
    except Exception as exc:  # the stage records the failure of one model and goes on with the next
        res["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        res["traceback"] = traceback.format_exc()[-4000:]
    res["total_s"] = time.perf_counter() - t0
    return res


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[0] + "\nusage: runner.py SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")   # apply_model sends a function to the worker
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    res = run(spec)
    out = Path(spec["out"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(out)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
