"""Serve checkpoints with vLLM: load each, inspect every linear layer, answer a file of chat requests, write one
JSON result per model. The live check and served evaluations share these engine starts.

Standalone on purpose: it runs under the vLLM venv (.venv-vllm, built by scripts/make_vllm_env.sh), where fp8mix is
not installed, so it imports only vllm, torch, PIL, its sibling modules and the standard library:

    .venv-vllm/bin/python src/fp8mix/check/vllm_live.py --model DIR --out result.json \
        [--requests requests.json] [--expect-fp8 NAME,NAME,...] [--expect-bf16 NAME,...] [--log vllm.log] \
        [--max-model-len 1024] [--max-num-seqs 16]
    .venv-vllm/bin/python src/fp8mix/check/vllm_live.py --jobs      # several models, one after the other

Jobs mode (``--jobs``) serves several models in one process, so vLLM is imported once: one JSON job per line on
stdin ({"model", "out", "requests", "expect_fp8": [...], "expect_bf16": [...], "max_model_len", "max_num_seqs",
"log"}: the options above), one reply line per job on stdout ({"out", "rc", "leftover"}) once its result file is
written; everything else the process prints goes to stderr. One engine at a time: each is shut down fully before
the next starts (vllm_engine.py); when one leaves something behind (``leftover`` says what), the process replies and
ends, and the caller starts a fresh one for the next model. vLLM is imported before the first job arrives.

Layer expectations. NAMEs may be vLLM layer names (``language_model.model.layers.1.self_attn.qkv_proj``), HF names
in either naming (``model.layers.1.self_attn.q_proj``, ``model.language_model.layers.1.mlp.gate_proj``: mapped with
the model's own ``hf_to_vllm_mapper`` and fused with its ``packed_modules_mapping``), or ``re:<regex>`` matched
(re.fullmatch) against vLLM names. Every NAME must match at least one layer, and every matched layer must hold
float8_e4m3fn (``--expect-fp8``) or bfloat16 (``--expect-bf16``) weights.

Requests (``--requests``; without it, one image and one text prompt are generated as a smoke test):
    {"requests": [{
        "id": "unique name",
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}, ...],
                                   # Hugging Face chat format; a string content is allowed too
        "images": ["a.png"],       # one file per image item, in order (relative to the request file)
        "add_generation_prompt": true,   # default: true unless the last message is the assistant's
        "max_tokens": 16,          # greedy tokens to generate (0: none, the prompt is only scored)
        "ignore_eos": false,
        "prompt_logprobs": 5,      # top-k logprobs at every prompt position (null: none)
        "continuation": [ids] | "generated" | null,   # tokens appended to the prompt and scored teacher-forced
        "continuation_logprobs": 5 # top-k at each continuation position
    }, ...]}
The prompt is rendered by vLLM's own chat path (``LLM.chat``: the checkpoint's chat template, its processor
config), as a served deployment renders it. Generation is greedy (temperature 0). A continuation is scored in a
second pass over the prompt's token ids plus the continuation (image placeholders collapsed so that vLLM expands
them again), so its logprobs come from one prefill, like ``prompt_logprobs``.

JSON written to --out (always, also on failure):
    {"ok", "vllm_version", "torch_version", "model", "quantization", "model_class",
     "layers": {vllm_name: {"quant_method", "scheme", "kernel", "weight_dtype", "weight_shape",
                            "weight_scale_dtype", "weight_scale_shape", "module"}},
     "attention": {vllm_name: {"kv_cache_dtype", "k_scale", "v_scale"}},
     "expectations": {...},
     "outputs": {id: {"prompt_token_ids", "n_image_tokens", "text", "token_ids", "finish_reason",
                      "prompt_logprobs": [null, {"logprob", "rank", "top": [[token, logprob], ...]}, ...],
                      "continuation": {"token_ids", "logprobs", "ranks", "top": [[[token, logprob], ...], ...]}}},
     "engine": {...}, "warnings": [...], "errors": [...], "timings_s": {...}}
``prompt_logprobs[i]`` is the distribution of prompt token i given tokens < i (entry 0 is null); ``logprob`` and
``rank`` are those of the prompt's own token i. ``timings_s``: ``import`` (vLLM's import, paid by the first model
of a process, 0 after), ``engine_start``, ``load`` (the two together), ``serve`` with its parts, ``shutdown``,
``total``. Exit status (one model): 0 ok, 1 a check failed, 2 vLLM raised (load or generation) or the request file
is invalid.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so ``LLM.apply_model`` hands us the real
``torch.nn.Module`` and vLLM's log records reach our handler. Any "Attempted to load weight ..." warning (a BF16
tensor loaded into an FP8 parameter, the silent failure mode of mismatched ignore lists) fails the check.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: its sibling modules
from vllm_engine import Engine  # noqa: E402
from vllm_layers import check_expectations, inspect_layers  # noqa: E402


def _set_env() -> None:
    """Settings that must be in place before vllm is imported (so not at module import: no side effects there)."""
    # In-process engine: LLM.apply_model then hands over the real module without pickling, and log records stay here.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU backend
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


LOAD_WARNING_PATTERNS = (re.compile(r"Attempted to load weight"),)
# What vLLM logs when a second engine starts in the same process (its kernel overrides and distributed identity
# set again): not the model's warnings, so left out of its result
REUSE_NOISE = (re.compile(r"Kernel \S+ is already registered\. Overwriting"),
               re.compile(r"Unknown vLLM environment variable detected: VLLM_DIST_IDENT"))
SMOKE_TOKENS = 8
REQUEST_KEYS = {"id", "messages", "images", "add_generation_prompt", "max_tokens", "ignore_eos", "prompt_logprobs",
                "continuation", "continuation_logprobs"}


class _Capture:
    """Keeps every log record created in this process (vLLM's, transformers', ...).

    A LogRecord factory, not a handler: vLLM re-runs logging.config.dictConfig when the engine starts, which drops
    any handler added to its loggers, but it leaves (and wraps) the record factory. Installed before vllm is
    imported, so vLLM's own factory wraps this one exactly once.
    """

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []
        self._inner = logging.getLogRecordFactory()

    def __call__(self, *args, **kwargs) -> logging.LogRecord:
        record = self._inner(*args, **kwargs)
        self.records.append(record)
        return record

    def install(self) -> None:
        logging.setLogRecordFactory(self)

    def lines(self, min_level: int = logging.DEBUG) -> list[str]:
        out = []
        for r in self.records:
            if r.levelno >= min_level:
                try:
                    msg = r.getMessage()
                except Exception:  # a bad format string must not kill the report
                    msg = str(r.msg)
                out.append(f"{r.levelname} {r.name} {r.filename}:{r.lineno}: {msg}")
        return out


def _smoke_image():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (112, 112), "white")
    d = ImageDraw.Draw(img)
    d.ellipse((14, 14, 62, 62), fill="red")
    d.rectangle((60, 60, 100, 100), fill="blue")
    return img


def _smoke_requests() -> list[dict]:
    """One image and one text prompt, 8 greedy tokens each (no --requests)."""
    return [{"id": "image", "messages": [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": "What shapes are in the picture?"}]}],
             "images": [_smoke_image()], "max_tokens": SMOKE_TOKENS, "ignore_eos": True},
            {"id": "text", "messages": [{"role": "user", "content": "The capital of France is"}],
             "images": [], "max_tokens": SMOKE_TOKENS, "ignore_eos": True}]


def _image_items(content) -> int:
    if isinstance(content, str):
        return 0
    return sum(1 for c in content if isinstance(c, dict) and c.get("type") == "image")


def load_requests(path: str) -> list[dict]:
    """The requests of a request file, validated, with their images opened (RGB)."""
    from PIL import Image

    with open(path) as f:
        doc = json.load(f)
    reqs = doc.get("requests") if isinstance(doc, dict) else None
    if not isinstance(reqs, list) or not reqs:
        raise ValueError(f"{path}: expected {{\"requests\": [...]}} with at least one request")
    base = os.path.dirname(os.path.abspath(path))
    seen = set()
    out = []
    for i, r in enumerate(reqs):
        where = f"{path}: request {i}"
        if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not r["id"]:
            raise ValueError(f"{where}: every request needs a string id")
        where = f"{path}: request {r['id']!r}"
        if r["id"] in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(r["id"])
        unknown = set(r) - REQUEST_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        msgs = r.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                              for m in msgs):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        paths = r.get("images", [])
        n_items = sum(_image_items(m["content"]) for m in msgs)
        if len(paths) != n_items:
            raise ValueError(f"{where}: {n_items} image item(s) in messages but {len(paths)} image file(s)")
        images = []
        for p in paths:
            full = p if os.path.isabs(p) else os.path.join(base, p)
            with Image.open(full) as im:
                images.append(im.convert("RGB"))
        cont = r.get("continuation")
        if cont is not None and cont != "generated" and not (isinstance(cont, list)
                                                             and all(isinstance(t, int) for t in cont)):
            raise ValueError(f"{where}: 'continuation' must be a list of token ids, \"generated\" or null")
        out.append({**r, "images": images})
    return out


def _vllm_messages(messages: list[dict], images: list) -> list[dict]:
    """HF chat messages with {"type": "image"} items -> vLLM chat messages with the PIL images in place."""
    it = iter(images)
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        parts = []
        for item in content:
            kind = item.get("type")
            if kind == "image":
                parts.append({"type": "image_pil", "image_pil": next(it)})
            elif kind == "text":
                parts.append({"type": "text", "text": item["text"]})
            else:
                raise ValueError(f"unsupported content item type {kind!r} (image and text only)")
        out.append({"role": m["role"], "content": parts})
    return out


def _position(lp: dict | None, token: int, k: int) -> dict | None:
    """One position's logprobs: the given token's logprob and rank, and the top-k (rank order)."""
    if lp is None:
        return None
    own = lp.get(token)
    ranked = sorted(((v.rank if v.rank is not None else 1 << 30, tid, v.logprob) for tid, v in lp.items()))
    top = [[tid, float(val)] for rank, tid, val in ranked if rank <= k][:k]
    return {"logprob": None if own is None else float(own.logprob),
            "rank": None if own is None else own.rank, "top": top}


def _collapse(ids: list[int], image_token_id: int | None) -> list[int]:
    """Runs of the image placeholder token collapsed to one (vLLM expands each placeholder again)."""
    if image_token_id is None:
        return list(ids)
    out: list[int] = []
    for t in ids:
        if t == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(t)
    return out


def serve(llm, requests: list[dict], errors: list[str], timings: dict) -> dict[str, dict]:
    """Answer every request (greedy generation, prompt logprobs, teacher-forced continuations)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    image_token_id = getattr(llm.llm_engine.model_config.hf_config, "image_token_id", None)
    outputs: dict[str, dict] = {}
    groups: dict[bool, list[dict]] = {}
    for r in requests:
        agp = r.get("add_generation_prompt")
        if agp is None:
            agp = r["messages"][-1]["role"] != "assistant"
        groups.setdefault(bool(agp), []).append(r)
    for agp, reqs in groups.items():
        t = time.perf_counter()
        params = [SamplingParams(temperature=0.0, max_tokens=max(1, int(r.get("max_tokens", 0))),
                                 ignore_eos=bool(r.get("ignore_eos", False)), seed=0,
                                 prompt_logprobs=r.get("prompt_logprobs")) for r in reqs]
        results = llm.chat([_vllm_messages(r["messages"], r["images"]) for r in reqs], params, use_tqdm=False,
                           add_generation_prompt=agp, continue_final_message=False)
        for r, res in zip(reqs, results):
            ids = list(res.prompt_token_ids or [])
            c = res.outputs[0]
            n_gen = int(r.get("max_tokens", 0))
            o = {"prompt_token_ids": ids, "n_image_tokens": sum(1 for t in ids if t == image_token_id),
                 "text": c.text if n_gen else "", "token_ids": list(c.token_ids) if n_gen else [],
                 "finish_reason": c.finish_reason if n_gen else None}
            k = r.get("prompt_logprobs")
            if k is not None:
                plp = res.prompt_logprobs or []
                o["prompt_logprobs"] = [_position(lp, t, k) for lp, t in zip(plp, ids)]
            outputs[r["id"]] = o
            if r["images"] and o["n_image_tokens"] == 0:
                errors.append(f"request {r['id']}: the prompt holds no image token: the image never reached "
                              "the model")
            if n_gen >= 4 and o["token_ids"] and all(t == 0 for t in o["token_ids"]):
                errors.append(f"request {r['id']}: token 0 repeated (NaN logits / garbage weights?)")
        timings[f"chat_{'prompts' if agp else 'conversations'}"] = round(time.perf_counter() - t, 2)
    scored = [r for r in requests if r.get("continuation") is not None]
    if scored:
        t = time.perf_counter()
        prompts, params, conts = [], [], []
        for r in scored:
            o = outputs[r["id"]]
            cont = o["token_ids"] if r["continuation"] == "generated" else list(r["continuation"])
            conts.append(cont)
            p = {"prompt_token_ids": _collapse(o["prompt_token_ids"] + cont, image_token_id)}
            if r["images"]:
                p["multi_modal_data"] = {"image": r["images"] if len(r["images"]) > 1 else r["images"][0]}
            prompts.append(TokensPrompt(**p))
            params.append(SamplingParams(temperature=0.0, max_tokens=1, seed=0,
                                         prompt_logprobs=int(r.get("continuation_logprobs", 5))))
        results = llm.generate(prompts, params, use_tqdm=False)
        for r, cont, res in zip(scored, conts, results):
            o = outputs[r["id"]]
            ids = list(res.prompt_token_ids or [])
            full = o["prompt_token_ids"] + cont
            if ids != full:
                errors.append(f"request {r['id']}: the continuation pass saw {len(ids)} prompt tokens, not the "
                              f"{len(full)} of prompt + continuation")
                continue
            k = int(r.get("continuation_logprobs", 5))
            n = len(o["prompt_token_ids"])
            pos = [_position(lp, t, k) for lp, t in zip((res.prompt_logprobs or [])[n:], cont)]
            o["continuation"] = {"token_ids": cont, "logprobs": [p["logprob"] for p in pos],
                                 "ranks": [p["rank"] for p in pos], "top": [p["top"] for p in pos]}
        timings["continuations"] = round(time.perf_counter() - t, 2)
    return outputs


def _split(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _import_vllm(state: dict) -> None:
    """Import torch and vLLM once per process; the first model served reports the time and the warnings."""
    if "import_s" in state:
        return
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch  # noqa: F401
        import vllm  # noqa: F401
        from vllm import LLM  # noqa: F401  (the engine's modules: most of the import time)
    state["import_s"] = round(time.perf_counter() - t, 2)
    state["unreported"] = {"import": state["import_s"], "warnings": caught}


def serve_model(job: dict, capture: _Capture, state: dict) -> tuple[int, str | None]:
    """Serve one model (a job: model, out, requests, expect_fp8, expect_bf16, max_model_len, max_num_seqs, log):
    start its engine, inspect its layers, answer its requests, shut the engine down, write the result to
    job["out"]. Returns (exit status, None or what the engine left that keeps this process from starting another)."""
    engine = {"max_model_len": int(job.get("max_model_len", 1024)), "max_num_seqs": int(job.get("max_num_seqs", 16))}
    result: dict = {"ok": False, "vllm_version": None, "torch_version": None, "model": os.path.abspath(job["model"]),
                    "quantization": None, "layers": {}, "attention": {}, "expectations": {}, "outputs": {},
                    "warnings": [], "errors": [], "timings_s": {},
                    "engine": {**engine, "dtype": "bfloat16", "enforce_eager": True, "enable_prefix_caching": False}}
    unreported = {"import": 0.0, "warnings": []}
    rc, eng = 2, None
    t0 = time.perf_counter()
    try:
        _import_vllm(state)
        import torch
        import vllm

        result["vllm_version"], result["torch_version"] = vllm.__version__, torch.__version__
        unreported = state.pop("unreported", unreported)
        t0 = time.perf_counter()
        requests = load_requests(job["requests"]) if job.get("requests") else _smoke_requests()
        n_images = max(sum(1 for _ in r["images"]) for r in requests)
        with warnings.catch_warnings(record=True) as py_warnings:
            warnings.simplefilter("always")
            eng = Engine(model=job["model"], dtype="bfloat16", enforce_eager=True, enable_prefix_caching=False,
                         limit_mm_per_prompt={"image": max(1, n_images), "video": 0}, seed=0, **engine)
            with eng:  # never bind eng.llm to a name here: the engine's memory must go when it shuts down
                result["timings_s"]["engine_start"] = round(time.perf_counter() - t0, 2)
                result["quantization"] = eng.llm.llm_engine.model_config.quantization
                info = eng.llm.apply_model(inspect_layers)[0]
                result["model_class"] = info["model_class"]
                result["layers"] = info["layers"]
                result["attention"] = info["attention"]
                if not info["layers"]:
                    result["errors"].append("no linear layer found in vLLM's model")
                expect = {"float8_e4m3fn": list(job.get("expect_fp8") or ()),
                          "bfloat16": list(job.get("expect_bf16") or ())}
                result["expectations"] = check_expectations(info["layers"], info["mapper"], info["packed"], expect,
                                                             result["errors"])
                t1 = time.perf_counter()
                result["outputs"] = serve(eng.llm, requests, result["errors"], result["timings_s"])
                result["timings_s"]["serve"] = round(time.perf_counter() - t1, 2)
                result["n_requests"] = len(requests)
        for w in [*unreported["warnings"], *py_warnings]:  # deprecation noise from torch/transformers is left out
            if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
                result["warnings"].append(f"{w.category.__name__}: {w.message}")
        rc = 0
    except (Exception, SystemExit) as e:  # report everything, including SystemExit from vLLM internals
        result["errors"].append(f"{type(e).__name__}: {e}")
        result["traceback"] = traceback.format_exc()[-6000:]
        rc = 2
    finally:
        logged = [line for line in capture.lines(logging.WARNING) if not any(p.search(line) for p in REUSE_NOISE)]
        result["warnings"] = list(dict.fromkeys(logged + result["warnings"]))
        for line in logged:
            if any(p.search(line) for p in LOAD_WARNING_PATTERNS):
                result["errors"].append(f"weight load warning: {line}")
        if eng is not None and eng.shutdown_s is not None:
            result["timings_s"]["shutdown"] = eng.shutdown_s
        if "engine_start" in result["timings_s"]:  # what starting this model's engine cost, vLLM's import included
            result["timings_s"]["import"] = unreported["import"]
            result["timings_s"]["load"] = round(unreported["import"] + result["timings_s"]["engine_start"], 2)
        result["timings_s"]["total"] = round(time.perf_counter() - t0 + unreported["import"], 2)
        if rc == 0 and result["errors"]:
            rc = 1
        result["ok"] = rc == 0
        _write_json(job["out"], result)
        if job.get("log"):
            with open(job["log"], "w") as f:
                f.write("\n".join(capture.lines()) + "\n")
        capture.records.clear()
        status = "OK" if result["ok"] else "FAILED: " + "; ".join(result["errors"])[:2000]
        print(f"vllm_live: {status} ({len(result['layers'])} layers, {len(result['outputs'])} requests, "
              f"{result['timings_s'].get('total')} s) -> {job['out']}", file=sys.stderr, flush=True)
    return rc, eng.leftover if eng is not None else None


def _write_json(path: str, doc: dict) -> None:
    """Written to a temporary name, then renamed: never half-written at `path`."""
    out = os.path.abspath(path)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, out)


def serve_jobs(capture: _Capture) -> int:
    """Jobs mode: one job per line on stdin, one reply line per job on stdout ({"out", "rc", "leftover"}); ends at
    the end of stdin, or after replying to a job whose engine left something behind (the caller starts a fresh
    process for the next model). Everything else this process prints goes to stderr."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    state: dict = {}
    try:
        _import_vllm(state)  # while the caller prepares the first model's requests
    except Exception:  # the first job imports again and reports the error
        state.clear()
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        rc, leftover = serve_model(job, capture, state)
        replies.write(json.dumps({"out": job["out"], "rc": rc, "leftover": leftover}) + "\n")
        if leftover:
            print(f"vllm_live: ending this process: {leftover}", file=sys.stderr, flush=True)
            break
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", action="store_true", help="serve several models: JSON jobs on stdin, replies on stdout")
    ap.add_argument("--model", help="checkpoint folder")
    ap.add_argument("--out", help="JSON result file")
    ap.add_argument("--requests", default=None, help="JSON file of chat requests (default: a smoke test)")
    ap.add_argument("--expect-fp8", default="", help="comma-separated layer names that must be float8_e4m3fn")
    ap.add_argument("--expect-bf16", default="", help="comma-separated layer names that must be bfloat16")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--log", default=None, help="also write every captured vLLM log line here")
    args = ap.parse_args(argv)
    if not args.jobs and not (args.model and args.out):
        ap.error("--model and --out are required (or --jobs)")
    _set_env()
    capture = _Capture()
    capture.install()
    if args.jobs:
        return serve_jobs(capture)
    job = {"model": args.model, "out": args.out, "requests": args.requests, "expect_fp8": _split(args.expect_fp8),
           "expect_bf16": _split(args.expect_bf16), "max_model_len": args.max_model_len,
           "max_num_seqs": args.max_num_seqs, "log": args.log}
    return serve_model(job, capture, {})[0]


if __name__ == "__main__":
    sys.exit(main())
