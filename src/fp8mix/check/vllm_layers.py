"""vLLM's layers as the live check sees them: every linear layer's quantization method, kernel and dtypes, and the
layer-name expectations (FP8 here, BF16 there) resolved against them.

Standalone, like vllm_live.py beside it (which imports it as a sibling module): it runs in the vLLM venv, where
fp8mix is not installed, and imports only torch, vLLM and the standard library.
"""
from __future__ import annotations

import re


def inspect_layers(model):
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
    # Attention layers with a KV cache: the cache dtype and the k/v scales vLLM runs them with (a scale it did not
    # find in the checkpoint is silently 1.0, so the live check compares them with the stored ones).
    attention = {name: {"kv_cache_dtype": str(mod.kv_cache_dtype), "k_scale": float(mod._k_scale_float),
                        "v_scale": float(mod._v_scale_float)}
                 for name, mod in model.named_modules()
                 if hasattr(mod, "kv_cache_dtype") and hasattr(mod, "_k_scale_float")}
    mapper = getattr(type(model), "hf_to_vllm_mapper", None) or getattr(model, "hf_to_vllm_mapper", None)
    packed = dict(getattr(model, "packed_modules_mapping", None) or {})
    return {"layers": layers, "attention": attention, "model_class": type(model).__name__, "mapper": mapper,
            "packed": packed}


def resolve(pattern: str, layer_names: list[str], mapper, packed: dict) -> list[str]:
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


def check_expectations(layers: dict, mapper, packed: dict, expect: dict[str, list[str]], errors: list[str]) -> dict:
    names = sorted(layers)
    report = {}
    for want, patterns in expect.items():
        for pat in patterns:
            hits = resolve(pat, names, mapper, packed)
            bad = [n for n in hits if layers[n]["weight_dtype"] != want]
            report[pat] = {"expected": want, "layers": hits,
                           "mismatch": {n: layers[n]["weight_dtype"] for n in bad}}
            if not hits:
                errors.append(f"expected {want} layer {pat!r} matches no linear layer in vLLM's model")
            for n in bad:
                errors.append(f"layer {n} ({pat}): weight dtype {layers[n]['weight_dtype']}, expected {want}")
    return report
