#!/usr/bin/env python3
"""GPU benchmark: vLLM serving throughput of BF16 and of every fp8mix catalog scheme, full-size Qwen2.5-VL-3B.

Run on a CUDA machine where vLLM is importable, from the repository root::

    PYTHONPATH=/tmp/site:src python3 benchmarks/bench_vllm.py --out bench_vllm.json [--proof CKPT]

``--plan-only`` (no GPU, no vLLM) makes the plans and model folders and prints what each scheme puts in FP8 and
its LM weight bytes. ``--schemes a,b`` runs a subset (priority order by default: bf16, full, top50, top25,
bits12, bits10); ``--resume`` keeps the schemes already measured in ``WORK/results.json`` (a second call on the
same machine); ``--time-budget S`` starts no scheme that would not finish within S seconds of the start.

Model: the full-size Qwen2.5-VL-3B architecture (``src/fp8mix/models/configs/qwen2_5_vl_3b.json``), served with
``load_format="dummy"`` (random weights: speed does not depend on the values). Tokenizer, chat template and image
processor are the embedded tiny model's (8,192 ids, Qwen2.5-VL's special tokens), so config.json's special-token
ids are set to that tokenizer's (image 5322, vision start/end 5319/5320, ...); the embedding keeps 151,936 rows.
The image processor's ``max_pixels`` is 448 x 448 (a 448 x 448 image stays 32 x 32 patches = 256 LM tokens).

Schemes: one plan per catalog scheme, made with fp8mix's own planner (``plan.planner.plan_scheme``) on the
meta-device model (``models.loading.build_empty``) from a SYNTHETIC sensitivity: block score 1 + |b - 17.5|
(the middle blocks least sensitive, the first and last most), split over a block's groups by parameter share
times a kind weight (qkv 1.0, o 0.6, gate_up 0.8, down 1.4) so that the group-level budget schemes (bits12,
bits10) choose groups, not only whole blocks. Each scheme's config.json gets fp8mix's own
``quantization_config(plan)`` (compressed-tensors FP8_DYNAMIC: per-channel FP8 weights, dynamic per-token FP8
activations; ``ignore`` = the plan's BF16 LM linears in both namings + ``re:.*visual.*`` + ``lm_head``); vLLM
initializes the FP8 weights and scales randomly.

Engines: one per scheme, each in its own process (a clean GPU for each), identical settings for all:
``ENGINE`` below (eager mode, no CUDA graphs / torch.compile, to keep engine start short; ``--cuda-graphs`` turns
vLLM's default compile + CUDA graphs back on, about 1-2 min more per engine; prefix caching off so that no
workload reuses another's KV cache). Workloads (``WORKLOADS``), in this order, after a small warm-up:

* prefill_images: 256 requests, each one distinct random-noise 448 x 448 image (256 LM tokens) + about 1,000
  random text tokens in the chat format, 1 output token. Metric: prompt tokens (image tokens included) / s.
* decode: 64 requests x 128 random prompt tokens, 512 output tokens. Metric: output tokens / s.
* mixed: 512 requests x 1,024 random prompt tokens, 256 output tokens (as the GPU anchors). Metric: total
  (prompt + output) tokens / s. The goal for fp8_autoquant_full is >= 1.3x BF16 here.

All requests of a workload go to one ``LLM.generate`` call; the time is its wall time (images are processed by
the HF processor inside it). Greedy, ``ignore_eos``, no detokenization (random weights emit ids the small
tokenizer lacks). Weight memory: what vLLM logs ("Model loading took X GiB") and the bytes of the served
model's parameters, by part (language model / vision tower), read inside the worker (``LLM.apply_model``),
which also lists every LM linear's quant scheme and kernel; fp8mix's plan gives the LM linear bytes on disk.

``--proof CKPT``: a real exported checkpoint (``fp8mix run --stop-after export`` on the embedded model) through
the GPU path: fp8mix's own live check (``src/fp8mix/check/vllm_live.py``: load, every linear's dtype/kernel
against the plan, an image prompt) and greedy exact-match accuracy on the held-out shapes questions, for the
checkpoint and for the embedded BF16 model, both in vLLM.

Writes the JSON after every scheme (a timeout keeps what was measured) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

CONFIG_3B = SRC / "fp8mix" / "models" / "configs" / "qwen2_5_vl_3b.json"
EMBEDDED = SRC / "fp8mix" / "models" / "embedded"
LIVE_CHECK = SRC / "fp8mix" / "check" / "vllm_live.py"

SCHEMES = ("bf16", "fp8_autoquant_full", "fp8_autoquant_top50", "fp8_autoquant_top25", "fp8_autoquant_bits12",
           "fp8_autoquant_bits10")
SHORT = {"bf16": "BF16", "fp8_autoquant_full": "full", "fp8_autoquant_top50": "top50",
         "fp8_autoquant_top25": "top25", "fp8_autoquant_bits12": "bits12", "fp8_autoquant_bits10": "bits10"}
ENGINE = {"dtype": "bfloat16", "load_format": "dummy", "max_model_len": 4096, "gpu_memory_utilization": 0.85,
          "enforce_eager": True, "enable_prefix_caching": False, "limit_mm_per_prompt": {"image": 1, "video": 0},
          "seed": 0}
WORKLOADS = {
    "prefill_images": {"n": 256, "image_px": 448, "text_tokens": 1000, "max_tokens": 1, "metric": "prompt"},
    "decode": {"n": 64, "in_tokens": 128, "max_tokens": 512, "metric": "output"},
    "mixed": {"n": 512, "in_tokens": 1024, "max_tokens": 256, "metric": "total"},
}
WARMUP = {"n_images": 4, "n_text": 16, "in_tokens": 256, "max_tokens": 16}
GOAL_MIXED_FULL = 1.3
MAX_PIXELS = 448 * 448
# the embedded tokenizer's special ids (tokenizer.json added_tokens)
TOKEN_IDS = {"bos_token_id": 5310, "eos_token_id": 5312, "pad_token_id": 5310, "vision_start_token_id": 5319,
             "vision_end_token_id": 5320, "vision_token_id": 5321, "image_token_id": 5322, "video_token_id": 5323}
TEXT_ID_RANGE = (0, 5300)   # ordinary BPE ids of the embedded tokenizer (specials start at 5310)
KIND_WEIGHT = {"qkv": 1.0, "o": 0.6, "gate_up": 0.8, "down": 1.4}
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def log(msg: str) -> None:
    print(f"[bench_vllm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- plans and model folders (CPU, no vLLM) ----------------------------------------------------------------------

def synthetic_sensitivity(layout) -> dict:
    """A sensitivity document in fp8mix's format (score/sensitivity.py), synthetic: middle blocks least sensitive."""
    mid = (layout.n_blocks - 1) / 2
    groups = []
    for b in range(layout.n_blocks):
        gs = layout.groups_of_block(b)
        total = sum(g.params for g in gs)
        for g in gs:
            score = (1.0 + abs(b - mid)) * g.params / total * KIND_WEIGHT[g.kind]
            groups.append({"name": g.name, "block": b, "kind": g.kind, "params": g.params, "score": score})
    block_scores = {b: sum(x["score"] for x in groups if x["block"] == b) for b in range(layout.n_blocks)}
    order = sorted(block_scores, key=lambda b: (block_scores[b], b))
    return {"groups": groups, "n_blocks": layout.n_blocks, "settings_key": "synthetic-middle-least-sensitive",
            "blocks": [{"block": b, "score": block_scores[b], "rank": order.index(b)} for b in block_scores]}


def write_model_dir(dst: Path, quantization_config: dict | None = None) -> Path:
    """config.json = the 3B fixture with the embedded tokenizer's special ids (+ quantization_config), and the
    embedded model's tokenizer, chat template and image processor (max_pixels = 448 x 448)."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(CONFIG_3B.read_text())
    cfg.update(TOKEN_IDS)
    cfg["torch_dtype"] = "bfloat16"
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in SIDE_FILES:
        shutil.copyfile(EMBEDDED / name, dst / name)
    pre = json.loads((EMBEDDED / "preprocessor_config.json").read_text())
    pre["size"] = {"longest_edge": MAX_PIXELS, "shortest_edge": 3136}
    (dst / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    proc = json.loads((EMBEDDED / "processor_config.json").read_text())
    if "image_processor" in proc:
        proc["image_processor"]["size"] = dict(pre["size"])
    (dst / "processor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    return dst


def weight_bytes(model, adapter, layout, fp8_modules: set[str]) -> dict:
    """Bytes of the served weights from the meta model: FP8 linears 1 B/param + float32 per-channel scale, the
    rest BF16 (tied lm_head counted once). fp8mix's on-disk accounting for fp8_dynamic."""
    lm_linear = lm_other = vision = other = 0
    lin_shapes = {}
    import torch

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            lin_shapes[name] = mod.weight.shape
    tied = f"{adapter.lm_head_path}.weight" if layout.tied_lm_head else None
    for name, p in model.named_parameters():   # tied weights appear once
        if name == tied:
            continue
        n = p.numel()
        mod = name.rsplit(".", 1)[0]
        if name.startswith(adapter.vision_path + "."):
            vision += 2 * n
        elif name.startswith(adapter.blocks_path + ".") and mod in lin_shapes and name.endswith(".weight"):
            lm_linear += (n + 4 * lin_shapes[mod][0]) if mod in fp8_modules else 2 * n
        elif name.startswith("model.language_model.") or name.startswith(adapter.lm_head_path + "."):
            lm_other += 2 * n
        else:
            other += 2 * n
    return {"lm_linear_bytes": lm_linear, "lm_bytes": lm_linear + lm_other, "vision_bytes": vision,
            "total_bytes": lm_linear + lm_other + vision + other}


def make_plans(work: Path, schemes: list[str]) -> dict:
    """Model folders for BF16 and each scheme, with fp8mix's plans. Returns {scheme: info}."""
    from fp8mix.export.compressed_tensors import quantization_config
    from fp8mix.models import loading
    from fp8mix.plan.catalog import load_catalog
    from fp8mix.plan.planner import plan_scheme

    base = write_model_dir(work / "models" / "bf16")
    model, adapter = loading.build_empty(base)
    layout = adapter.layout(model)
    catalog, _ = load_catalog()
    sens = {**synthetic_sensitivity(layout), "model_layout": adapter.plan_facts(model)}
    (work / "sensitivity_synthetic.json").write_text(json.dumps(sens, indent=1))
    out = {}
    for name in schemes:
        if name == "bf16":
            out[name] = {"dir": str(base), "fp8_modules": [], "coverage": None, "effective_bits": 16.0,
                         **weight_bytes(model, adapter, layout, set())}
            continue
        plan = plan_scheme(name, catalog, sens)
        qcfg = quantization_config(plan)
        d = write_model_dir(work / "models" / name, qcfg)
        (d / "fp8mix_plan.json").write_text(json.dumps(plan, indent=1))
        out[name] = {"dir": str(d), "fp8_blocks": plan["fp8_blocks"], "coverage": plan["coverage"],
                     "effective_bits": plan["effective_bits"], "n_ignore": len(plan["ignore"]),
                     "n_fp8_modules": len(plan["fp8_modules"]), "fp8_format": plan["fp8_format"],
                     "compressed_tensors_version": qcfg.get("version"),
                     **weight_bytes(model, adapter, layout, set(plan["fp8_modules"]))}
    return out


# ---- the child: one vLLM engine ----------------------------------------------------------------------------------

def _probe(model):
    """Runs inside vLLM's worker: weight bytes by part and every linear's quantization, picklable."""
    import collections

    import torch

    try:
        from vllm.model_executor.layers.linear import LinearBase
    except Exception:  # pragma: no cover
        LinearBase = torch.nn.Module
    parts = collections.Counter()
    dtypes = collections.Counter()
    for name, p in model.named_parameters():
        part = "vision" if "visual" in name else ("lm" if "language_model" in name or "lm_head" in name else "other")
        parts[part] += p.numel() * p.element_size()
        dtypes[f"{part}:{str(p.dtype).replace('torch.', '')}"] += p.numel() * p.element_size()
    lm_fp8, lm_bf16, vis_fp8, kernels = [], [], [], collections.Counter()
    for name, mod in model.named_modules():
        if not isinstance(mod, LinearBase):
            continue
        qm = getattr(mod, "quant_method", None)
        scheme = getattr(mod, "scheme", None) or getattr(qm, "scheme", None)
        kernel = getattr(scheme, "fp8_linear", None) or getattr(scheme, "kernel", None)
        w = getattr(mod, "weight", None)
        is_fp8 = w is not None and "float8" in str(w.dtype)
        if "visual" in name:
            if is_fp8:
                vis_fp8.append(name)
            continue
        if "layers." not in name:
            continue
        (lm_fp8 if is_fp8 else lm_bf16).append(name)
        kernels[f"{type(qm).__name__}/{type(scheme).__name__ if scheme else '-'}/"
                f"{type(kernel).__name__ if kernel else '-'}"] += 1
    return {"param_bytes": dict(parts), "param_bytes_by_dtype": dict(dtypes), "lm_fp8_layers": sorted(lm_fp8),
            "n_lm_fp8": len(lm_fp8), "n_lm_bf16": len(lm_bf16), "vision_fp8_layers": sorted(vis_fp8),
            "lm_linear_kernels": dict(kernels), "model_class": type(model).__name__}


def _words(tokenizer, rng) -> list[str]:
    vocab = [t for t, i in tokenizer.get_vocab().items()
             if i < TEXT_ID_RANGE[1] and t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3]
    return [" " + t[1:] for t in vocab]


def _image(rng, px: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8))


def _image_prompts(tokenizer, rng, n: int, px: int, text_tokens: int) -> list[dict]:
    words = _words(tokenizer, rng)
    out = []
    for _ in range(n):
        text = "".join(words[int(i)] for i in rng.integers(0, len(words), text_tokens + 64))
        ids = tokenizer.encode(text, add_special_tokens=False)[:text_tokens]
        text = tokenizer.decode(ids)
        prompt = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + text +
                  "<|im_end|>\n<|im_start|>assistant\n")
        out.append({"prompt": prompt, "multi_modal_data": {"image": _image(rng, px)}})
    return out


def _token_prompts(rng, n: int, length: int) -> list[dict]:
    ids = rng.integers(TEXT_ID_RANGE[0], TEXT_ID_RANGE[1], (n, length))
    return [{"prompt_token_ids": [int(x) for x in row]} for row in ids]


def _timed_generate(llm, prompts, sp) -> dict:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    n_prompt = sum(len(o.prompt_token_ids or []) for o in outs)
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"requests": len(outs), "seconds": round(dt, 3), "prompt_tokens": n_prompt, "output_tokens": n_out,
            "prompt_tok_s": round(n_prompt / dt, 1), "output_tok_s": round(n_out / dt, 1),
            "total_tok_s": round((n_prompt + n_out) / dt, 1), "requests_s": round(len(outs) / dt, 3)}


def _shapes_accuracy(llm, n: int) -> dict:
    from vllm import SamplingParams

    from fp8mix.data import shapes

    samples = shapes.samples("eval", n)
    convs = []
    for s in samples:
        q = s.messages[0]["content"][-1]["text"]
        convs.append([{"role": "user", "content": [{"type": "image_pil", "image_pil": s.images[0]},
                                                   {"type": "text", "text": q}]}])
    sp = SamplingParams(temperature=0.0, max_tokens=8, seed=0)
    outs = llm.chat(convs, sp, use_tqdm=False)
    norm = lambda t: t.strip().lower().rstrip(".")  # noqa: E731
    answers = [o.outputs[0].text for o in outs]
    right = [norm(a) == norm(s.answer) for a, s in zip(answers, samples)]
    return {"n": n, "accuracy": sum(right) / n, "answers": answers[:8], "references": [s.answer for s in samples[:8]],
            "all_answers": answers}


def run_child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")   # LLM.apply_model(_probe) across processes
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    res: dict = {"label": spec["label"], "ok": False, "workloads": {}}
    out = Path(spec["out"])
    t_all = time.perf_counter()
    try:
        import numpy as np
        import torch
        import vllm
        from vllm import LLM, SamplingParams

        res["vllm_version"], res["torch_version"] = vllm.__version__, torch.__version__
        res["import_s"] = round(time.perf_counter() - t_all, 1)
        t0 = time.perf_counter()
        llm = LLM(model=spec["model"], **spec["engine"])
        res["engine_start_s"] = round(time.perf_counter() - t0, 1)
        res["quantization"] = llm.llm_engine.model_config.quantization
        try:
            res["probe"] = llm.apply_model(_probe)[0]
        except Exception as e:  # the figures below do not need it
            res["probe_error"] = f"{type(e).__name__}: {e}"
        rng = np.random.default_rng(spec.get("seed", 0))
        tok = llm.get_tokenizer()
        if spec.get("shapes_eval"):
            res["shapes_eval"] = _shapes_accuracy(llm, spec["shapes_eval"])
        if spec.get("workloads"):
            w = WARMUP
            warm = _image_prompts(tok, rng, w["n_images"], WORKLOADS["prefill_images"]["image_px"], w["in_tokens"])
            warm += _token_prompts(rng, w["n_text"], w["in_tokens"])
            sp = SamplingParams(temperature=0.0, max_tokens=w["max_tokens"], ignore_eos=True, detokenize=False)
            res["warmup"] = _timed_generate(llm, warm, sp)
        for name in spec.get("workloads", []):
            w = WORKLOADS[name]
            if name == "prefill_images":
                prompts = _image_prompts(tok, rng, w["n"], w["image_px"], w["text_tokens"])
            else:
                prompts = _token_prompts(rng, w["n"], w["in_tokens"])
            sp = SamplingParams(temperature=0.0, max_tokens=w["max_tokens"], ignore_eos=True, detokenize=False)
            r = _timed_generate(llm, prompts, sp)
            r["metric"] = w["metric"]
            r["tok_s"] = r[f"{w['metric']}_tok_s"]
            res["workloads"][name] = r
            log(f"{spec['label']} {name}: {r['tok_s']:,.0f} {w['metric']} tok/s ({r['seconds']} s)")
            out.write_text(json.dumps(res, indent=1, default=str))
        res["ok"] = True
    except BaseException as e:  # report everything
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-4000:]
    res["child_s"] = round(time.perf_counter() - t_all, 1)
    out.write_text(json.dumps(res, indent=1, default=str))
    try:   # stop the engine-core process before leaving (the parent also kills the process group)
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    sys.stdout.flush()
    os._exit(0 if res["ok"] else 1)   # skip vLLM's slow interpreter teardown


def launch(label: str, work: Path, spec: dict, timeout: float) -> dict:
    """One engine in its own process; returns its JSON plus what its log says."""
    spec = {**spec, "label": label, "out": str(work / f"{label}.result.json")}
    spec_path = work / f"{label}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = work / f"{label}.log"
    Path(spec["out"]).unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        # its own process group, so that vLLM's engine-core process goes with it (killpg below)
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    wait_gpu_free()
    res = json.loads(Path(spec["out"]).read_text()) if Path(spec["out"]).is_file() else {"ok": False}
    res["rc"], res["wall_s"] = rc, round(time.perf_counter() - t0, 1)
    text = log_path.read_text(errors="replace")
    m = re.search(r"Model loading took ([\d.]+) GiB", text)
    res["vllm_model_gib"] = float(m.group(1)) if m else None
    for pat, key in ((r"Available KV cache memory: ([\d.]+) GiB", "kv_cache_gib"),
                     (r"GPU KV cache size: ([\d,]+) tokens", "kv_cache_tokens")):
        mm = re.search(pat, text)
        if mm:
            res[key] = next(g for g in mm.groups() if g)
    if not res.get("ok"):
        res["log_tail"] = text[-3000:]
    return res


def wait_gpu_free(limit_mib: int = 2048, timeout: float = 60.0) -> None:
    """Until the GPU's used memory is back under limit_mib (the last engine's memory released)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=20).stdout.split()
            if not used or int(used[0]) < limit_mib:
                return
        except Exception:
            return
        time.sleep(1.0)
    log(f"GPU memory still in use after {timeout:.0f} s")


def machine() -> dict:
    info = {"python": platform.python_version(), "host": platform.node()}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
        info["gpu"] = q
    except Exception as e:
        info["gpu"] = f"nvidia-smi failed: {e}"
    for mod in ("torch", "transformers", "vllm", "compressed_tensors"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:
            info[mod] = f"not importable ({type(e).__name__})"
    return info


# ---- the proof: a real exported checkpoint ----------------------------------------------------------------------

def run_proof(ckpt: Path, plan_file: Path, work: Path, n_eval: int) -> dict:
    from fp8mix.models import Qwen2_5_VLAdapter

    plan = json.loads(plan_file.read_text())   # the run's plans/<scheme>.json
    ad = Qwen2_5_VLAdapter()
    fp8 = [ad.to_disk(m) for m in plan["fp8_modules"]]
    bf16 = [ad.to_disk(m) for m in plan["bf16_modules"]]
    proof: dict = {"checkpoint": str(ckpt), "plan": str(plan_file), "scheme": plan.get("scheme"), "fp8_blocks": plan.get("fp8_blocks"),
                   "n_fp8_modules": len(fp8), "n_bf16_modules": len(bf16)}
    live_out = work / "proof_live.json"
    t0 = time.perf_counter()
    cmd = [sys.executable, str(LIVE_CHECK), "--model", str(ckpt), "--out", str(live_out),
           "--expect-fp8", ",".join(fp8), "--expect-bf16", ",".join(bf16 + ["re:.*visual.*"])]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    live = json.loads(live_out.read_text()) if live_out.is_file() else {"ok": False, "errors": [p.stderr[-2000:]]}
    kernels: dict = {}
    for name, lay in live.get("layers", {}).items():
        key = f"{lay.get('weight_dtype')}:{lay.get('scheme')}:{lay.get('kernel')}"
        kernels[key] = kernels.get(key, 0) + 1
    proof["live_check"] = {"ok": live.get("ok"), "rc": p.returncode, "errors": live.get("errors", [])[:10],
                           "quantization": live.get("quantization"), "layer_kinds": kernels,
                           "generations": live.get("outputs"), "timings_s": live.get("timings_s"),
                           "n_layers": len(live.get("layers", {})), "wall_s": round(time.perf_counter() - t0, 1)}
    engine = {"dtype": "bfloat16", "max_model_len": 2048, "gpu_memory_utilization": 0.3, "enforce_eager": True,
              "limit_mm_per_prompt": {"image": 1, "video": 0}, "seed": 0}
    for label, model in (("proof_fp8", ckpt), ("proof_bf16", EMBEDDED)):
        r = launch(label, work, {"model": str(model), "engine": engine, "shapes_eval": n_eval, "workloads": []}, 400)
        proof[label] = {k: r.get(k) for k in ("ok", "error", "engine_start_s", "quantization", "vllm_model_gib",
                                              "wall_s", "log_tail")}
        if r.get("probe"):
            proof[label]["probe"] = {k: r["probe"][k] for k in ("n_lm_fp8", "n_lm_bf16", "lm_linear_kernels",
                                                                "lm_fp8_layers", "vision_fp8_layers")}
        if r.get("shapes_eval"):
            proof[label]["shapes_eval"] = {k: r["shapes_eval"][k] for k in ("n", "accuracy", "answers", "references")}
            proof[label]["_answers"] = r["shapes_eval"]["all_answers"]
    a, b = proof["proof_fp8"].pop("_answers", None), proof["proof_bf16"].pop("_answers", None)
    if a and b:
        proof["fp8_vs_bf16_same_answer"] = sum(x == y for x, y in zip(a, b)) / len(a)
    expect_fp8_vllm = len(plan.get("fp8_groups", []))   # one fused vLLM layer per FP8 group
    proof["expected_fp8_vllm_layers"] = expect_fp8_vllm
    got = (proof["proof_fp8"].get("probe") or {}).get("n_lm_fp8")
    proof["ok"] = bool(live.get("ok")) and proof["proof_fp8"].get("ok") and got == expect_fp8_vllm
    return proof


# ---- the report --------------------------------------------------------------------------------------------------

def ratios(results: dict) -> None:
    base = results.get("bf16", {}).get("workloads", {})
    for name, r in results.items():
        for wl, w in r.get("workloads", {}).items():
            if wl in base and base[wl].get("tok_s"):
                w["ratio_to_bf16"] = round(w["tok_s"] / base[wl]["tok_s"], 3)


def table(doc: dict) -> str:
    res, plans = doc["results"], doc["plans"]
    rows = ["| scheme | LM blocks FP8 | LM linear params FP8 | eff. bits | LM weights GiB | vLLM weights GiB | "
            "prefill+images tok/s | decode out tok/s | mixed tok/s | mixed ÷ BF16 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in SCHEMES:
        if name not in plans:
            continue
        p, r = plans[name], res.get(name, {})
        cov = p.get("coverage") or {}
        wl = r.get("workloads", {})

        def cell(k):
            w = wl.get(k)
            if not w:
                return "not run"
            s = f"{w['tok_s']:,.0f}"
            return s + (f" ({w['ratio_to_bf16']:.2f}×)" if name != "bf16" and "ratio_to_bf16" in w else "")

        mixed = wl.get("mixed", {}).get("ratio_to_bf16")
        gib = r.get("vllm_model_gib")
        rows.append(f"| {SHORT[name]} | {cov.get('blocks_fp8', 0)}/{cov.get('blocks_total', 36)} | "
                    f"{cov.get('lm_params_fp8_fraction', 0):.0%} | {p['effective_bits']:.2f} | "
                    f"{p['lm_bytes'] / 2**30:.2f} | {gib if gib is not None else '-'} | {cell('prefill_images')} | "
                    f"{cell('decode')} | {cell('mixed')} | {f'{mixed:.2f}×' if mixed else '-'} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="JSON result file")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated, or 'none'")
    ap.add_argument("--work", default="/tmp/bench_vllm", help="model folders, logs, results.json")
    ap.add_argument("--proof", default=None, help="a real exported checkpoint folder to run through vLLM")
    ap.add_argument("--proof-plan", default=None, help="its plan (RUN/plans/<scheme>.json)")
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--time-budget", type=float, default=3600.0, help="seconds; no scheme starts past it")
    ap.add_argument("--per-scheme-s", type=float, default=150.0, help="estimate used before one was measured")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="vLLM's default torch.compile + CUDA graphs instead of eager (engine start ~1-2 min)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args.child)
    t_start = time.perf_counter()
    if args.cuda_graphs:
        ENGINE["enforce_eager"] = False
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    schemes = [] if args.schemes == "none" else [s.strip() for s in args.schemes.split(",") if s.strip()]
    state_file = work / "results.json"
    doc = json.loads(state_file.read_text()) if args.resume and state_file.is_file() else {}
    doc.setdefault("results", {})
    doc.update({"date": datetime.date.today().isoformat(), "machine": machine(), "engine": ENGINE,
                "workloads": WORKLOADS, "warmup": WARMUP, "config": str(CONFIG_3B.relative_to(ROOT)),
                "token_ids": TOKEN_IDS, "max_pixels": MAX_PIXELS, "kind_weight": KIND_WEIGHT})
    doc["plans"] = make_plans(work, list(SCHEMES))
    log("plans: " + "; ".join(f"{SHORT[k]}: {v['effective_bits']:.2f} bits, "
                              f"{(v.get('coverage') or {}).get('blocks_fp8', 0)} FP8 blocks, "
                              f"LM {v['lm_bytes'] / 2**30:.2f} GiB" for k, v in doc["plans"].items()))

    def save():
        ratios(doc["results"])
        text = json.dumps(doc, indent=1, default=str)
        state_file.write_text(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)

    save()
    if args.plan_only:
        print(table(doc))
        return 0
    if args.proof:
        log(f"proof with {args.proof}")
        doc["proof"] = run_proof(Path(args.proof), Path(args.proof_plan), work, args.eval_samples)
        log(f"proof ok={doc['proof']['ok']}: " + json.dumps({k: doc['proof'].get(k) for k in
                                                             ("expected_fp8_vllm_layers", "fp8_vs_bf16_same_answer")}))
        save()
    spent = []
    for name in schemes:
        if doc["results"].get(name, {}).get("ok"):
            log(f"{name}: already measured (resume)")
            continue
        elapsed = time.perf_counter() - t_start
        need = max(spent) if spent else args.per_scheme_s
        if elapsed + need * 1.1 > args.time_budget:
            doc["results"].setdefault(name, {})["skipped"] = (f"time budget: {elapsed:.0f} s spent, about "
                                                              f"{need:.0f} s needed, budget {args.time_budget:.0f} s")
            log(f"{name}: skipped ({doc['results'][name]['skipped']})")
            save()
            continue
        log(f"{name}: engine")
        t0 = time.perf_counter()
        r = launch(name, work, {"model": doc["plans"][name]["dir"], "engine": ENGINE,
                                "workloads": list(WORKLOADS)}, timeout=max(60.0, args.time_budget - elapsed))
        spent.append(time.perf_counter() - t0)
        doc["results"][name] = r
        log(f"{name}: ok={r.get('ok')} in {r['wall_s']} s (engine {r.get('engine_start_s')} s, "
            f"vLLM weights {r.get('vllm_model_gib')} GiB) {r.get('error', '')}")
        save()
    save()
    print(table(doc))
    full = doc["results"].get("fp8_autoquant_full", {}).get("workloads", {}).get("mixed", {}).get("ratio_to_bf16")
    if full is not None:
        print(f"goal: fp8_autoquant_full mixed ÷ BF16 = {full:.2f} (goal >= {GOAL_MIXED_FULL}): "
              f"{'met' if full >= GOAL_MIXED_FULL else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
