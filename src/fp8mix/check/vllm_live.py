"""Live vLLM check of a checkpoint: load it with vLLM, inspect every linear layer, generate, write a JSON verdict.

Standalone on purpose: it runs under the vLLM venv (.venv-vllm, built by scripts/make_vllm_env.sh), where fp8mix is
not installed, so it imports only vllm, torch, PIL and the standard library:

    .venv-vllm/bin/python src/fp8mix/check/vllm_live.py --model DIR --out result.json \
        [--expect-fp8 NAME,NAME,...] [--expect-bf16 NAME,...] [--log vllm.log]

NAMEs may be vLLM layer names (``language_model.model.layers.1.self_attn.qkv_proj``), HF names in either naming
(``model.layers.1.self_attn.q_proj``, ``model.language_model.layers.1.mlp.gate_proj``: mapped with the model's own
``hf_to_vllm_mapper`` and fused with its ``packed_modules_mapping``), or ``re:<regex>`` matched (re.fullmatch)
against vLLM names. Every NAME must match at least one layer, and every matched layer must hold float8_e4m3fn
(``--expect-fp8``) or bfloat16 (``--expect-bf16``) weights.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so ``LLM.apply_model`` hands us the real
``torch.nn.Module`` and vLLM's log records reach our handler. Any "Attempted to load weight ..." warning (a BF16
tensor loaded into an FP8 parameter, the silent failure mode of mismatched ignore lists) fails the check.

JSON written to --out (always, also on failure):
    {"ok", "vllm_version", "torch_version", "model", "quantization", "layers": {vllm_name: {"quant_method",
     "scheme", "kernel", "weight_dtype", "weight_shape", "weight_scale_dtype", "weight_scale_shape", "module"}},
     "expectations": {...}, "generations": {"image": {"prompt", "text", "token_ids"}, "text": {...}},
     "warnings": [...], "errors": [...], "timings_s": {...}}
Exit status: 0 ok, 1 a check failed, 2 vLLM raised (load or generation).
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
MAX_TOKENS = 8


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


def _make_image():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (112, 112), "white")
    d = ImageDraw.Draw(img)
    d.ellipse((14, 14, 62, 62), fill="red")
    d.rectangle((60, 60, 100, 100), fill="blue")
    return img


def _inspect(model):
    """Runs inside the worker (here: this process). Returns a picklable description of every linear layer."""
    import torch

    try:
        from vllm.model_executor.layers.linear import LinearBase
    except Exception:  # pragma: no cover - layout change
        LinearBase = ()
    try:
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    except Exception:  # pragma: no cover
        ParallelLMHead = ()

    def tensor_info(t):
        if t is None or not isinstance(t, torch.Tensor):
            return None, None
        return str(t.dtype).replace("torch.", ""), list(t.shape)

    layers = {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, LinearBase) or isinstance(mod, ParallelLMHead)):
            continue
        qm = getattr(mod, "quant_method", None)
        scheme = getattr(mod, "scheme", None) or getattr(qm, "scheme", None)
        kernel = getattr(scheme, "kernel", None) or getattr(qm, "kernel", None) \
            or getattr(scheme, "fp8_linear", None)
        w = getattr(mod, "weight", None)
        if w is None:
            w = next((p for _, p in mod.named_parameters(recurse=False)), None)
        wd, ws = tensor_info(w)
        sd, ss = tensor_info(getattr(mod, "weight_scale", None))
        layers[name] = {
            "module": type(mod).__name__,
            "quant_method": type(qm).__name__ if qm is not None else None,
            "scheme": type(scheme).__name__ if scheme is not None else None,
            "kernel": type(kernel).__name__ if kernel is not None else None,
            "weight_dtype": wd, "weight_shape": ws,
            "weight_scale_dtype": sd, "weight_scale_shape": ss,
        }
    mapper = getattr(type(model), "hf_to_vllm_mapper", None) or getattr(model, "hf_to_vllm_mapper", None)
    packed = dict(getattr(model, "packed_modules_mapping", None) or {})
    return {"layers": layers, "model_class": type(model).__name__, "mapper": mapper, "packed": packed}


def _resolve(pattern: str, layer_names: list[str], mapper, packed: dict) -> list[str]:
    """Layer names matched by one --expect-* entry."""
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return [n for n in layer_names if rx.fullmatch(n)]
    candidates = {pattern}
    if mapper is not None:  # map as a weight name too: prefix rules like "lm_head." need the trailing part
        for key, suffix in ((pattern, ""), (pattern + ".weight", ".weight")):
            try:
                mapped = mapper._map_name(key)
            except Exception:
                mapped = None
            if mapped and mapped.endswith(suffix):
                candidates.add(mapped[: len(mapped) - len(suffix)])
    for cand in list(candidates):  # unfused shard name -> fused vLLM layer name
        head, _, last = cand.rpartition(".")
        for fused, shards in packed.items():
            if last in shards:
                candidates.add(f"{head}.{fused}" if head else fused)
    return [n for n in layer_names if n in candidates]


def _check_expectations(layers: dict, mapper, packed: dict, expect: dict[str, list[str]], errors: list[str]) -> dict:
    names = sorted(layers)
    report = {}
    for want, patterns in expect.items():
        for pat in patterns:
            hits = _resolve(pat, names, mapper, packed)
            bad = [n for n in hits if layers[n]["weight_dtype"] != want]
            report[pat] = {"expected": want, "layers": hits,
                           "mismatch": {n: layers[n]["weight_dtype"] for n in bad}}
            if not hits:
                errors.append(f"expected {want} layer {pat!r} matches no linear layer in vLLM's model")
            for n in bad:
                errors.append(f"layer {n} ({pat}): weight dtype {layers[n]['weight_dtype']}, expected {want}")
    return report


def _split(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder")
    ap.add_argument("--out", required=True, help="JSON result file")
    ap.add_argument("--expect-fp8", default="", help="comma-separated layer names that must be float8_e4m3fn")
    ap.add_argument("--expect-bf16", default="", help="comma-separated layer names that must be bfloat16")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--log", default=None, help="also write every captured vLLM log line here")
    args = ap.parse_args(argv)
    _set_env()

    result: dict = {"ok": False, "vllm_version": None, "torch_version": None, "model": os.path.abspath(args.model),
                    "quantization": None, "layers": {}, "expectations": {}, "generations": {}, "warnings": [],
                    "errors": [], "timings_s": {}}
    capture = _Capture()
    rc = 2
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as py_warnings:
            warnings.simplefilter("always")
            capture.install()
            import torch
            import vllm
            from vllm import LLM, SamplingParams

            result["vllm_version"] = vllm.__version__
            result["torch_version"] = torch.__version__

            llm = LLM(model=args.model, dtype="bfloat16", enforce_eager=True, max_model_len=args.max_model_len,
                      max_num_seqs=2, limit_mm_per_prompt={"image": 1, "video": 0}, seed=0)
            result["timings_s"]["load"] = round(time.perf_counter() - t0, 2)
            result["quantization"] = llm.llm_engine.model_config.quantization

            info = llm.apply_model(_inspect)[0]
            result["model_class"] = info["model_class"]
            result["layers"] = info["layers"]
            if not info["layers"]:
                result["errors"].append("no linear layer found in vLLM's model")
            expect = {"float8_e4m3fn": _split(args.expect_fp8), "bfloat16": _split(args.expect_bf16)}
            result["expectations"] = _check_expectations(info["layers"], info["mapper"], info["packed"], expect,
                                                         result["errors"])

            sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, seed=0)
            t1 = time.perf_counter()
            question = "What shapes are in the picture?"
            msgs = [{"role": "user", "content": [{"type": "image_pil", "image_pil": _make_image()},
                                                 {"type": "text", "text": question}]}]
            out_img = llm.chat(msgs, sp, use_tqdm=False)[0]
            prompt = "The capital of France is"
            out_txt = llm.generate([prompt], sp, use_tqdm=False)[0]
            result["timings_s"]["generate"] = round(time.perf_counter() - t1, 2)
            for key, out, p in (("image", out_img, question), ("text", out_txt, prompt)):
                c = out.outputs[0]
                ids = list(c.token_ids)
                result["generations"][key] = {"prompt": p, "n_prompt_tokens": len(out.prompt_token_ids or []),
                                              "text": c.text, "token_ids": ids}
                if len(ids) != MAX_TOKENS:
                    result["errors"].append(f"{key} prompt: {len(ids)} tokens generated, expected {MAX_TOKENS}")
                elif all(i == 0 for i in ids):
                    result["errors"].append(f"{key} prompt: token 0 repeated (NaN logits / garbage weights?)")
            image_token_id = getattr(llm.llm_engine.model_config.hf_config, "image_token_id", None)
            n_img = sum(1 for i in (out_img.prompt_token_ids or []) if i == image_token_id)
            result["generations"]["image"]["n_image_tokens"] = n_img
            if image_token_id is not None and n_img == 0:
                result["errors"].append("image prompt holds no image token: the image never reached the model")
        for w in py_warnings:  # deprecation noise from torch/transformers is left out
            if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
                result["warnings"].append(f"{w.category.__name__}: {w.message}")
        rc = 0
    except (Exception, SystemExit) as e:  # report everything, including SystemExit from vLLM internals
        result["errors"].append(f"{type(e).__name__}: {e}")
        result["traceback"] = traceback.format_exc()[-6000:]
        rc = 2
    finally:
        result["warnings"] = list(dict.fromkeys(capture.lines(logging.WARNING) + result["warnings"]))
        for line in capture.lines(logging.WARNING):
            if any(p.search(line) for p in LOAD_WARNING_PATTERNS):
                result["errors"].append(f"weight load warning: {line}")
        result["timings_s"]["total"] = round(time.perf_counter() - t0, 2)
        if rc == 0 and result["errors"]:
            rc = 1
        result["ok"] = rc == 0
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True, default=str)
        if args.log:
            with open(args.log, "w") as f:
                f.write("\n".join(capture.lines()) + "\n")
        status = "OK" if result["ok"] else "FAILED: " + "; ".join(result["errors"])[:2000]
        print(f"vllm_live: {status} ({len(result['layers'])} layers, {result['timings_s'].get('total')} s) "
              f"-> {args.out}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
