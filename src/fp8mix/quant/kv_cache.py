"""FP8 KV cache in transformers: calibrate per-layer k/v scales, and run a model whose attention reads its keys and
values back from an FP8 cache as vLLM does.

Both hook the point where the keys are post-RoPE and the values are final, which is what vLLM writes into its cache:
the arguments of the attention function (transformers' ``AttentionInterface``). Inside ``attention_hooked`` the
model's attention implementation (sdpa, eager, ...) is wrapped, for the given attention modules only (the vision
tower's attention is left alone): the wrapper passes (key, value) through the module's hook and calls the original
function. On exit the implementation is the original one again. The numbers come from ``numerics``
(``kv_cache_scale``, ``fake_quant_kv``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..data.samples import model_inputs
from ..errors import FP8MixError
from ..progress import Progress, no_progress
from .numerics import fake_quant_kv, kv_cache_scale

__all__ = ["KVScales", "attention_hooked", "attention_modules", "calibrate_kv_scales", "kv_cache_quantized"]

# attention module name -> (k_scale, v_scale), float32 [1] each
KVScales = dict[str, tuple[torch.Tensor, torch.Tensor]]
KVHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def attention_modules(layout) -> list[str]:
    """The LM attention modules of a model layout: the parents of its fused q/k/v groups (``…layers.N.self_attn``),
    in block order."""
    names = [g.name.rsplit(".", 1)[0] for g in layout.groups if g.kind == "qkv"]
    if not names:
        raise FP8MixError("the model layout has no q/k/v groups: no attention layer to give a KV cache")
    return names


@contextmanager
def attention_hooked(model: nn.Module, hooks: dict[str, KVHook]) -> Iterator[None]:
    """Inside the block, the attention modules named in ``hooks`` see (key, value) = hook(key, value) before their
    attention function runs. Every hooked module must use the same attention implementation."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mods = {name: model.get_submodule(name) for name in hooks}
    impls = {getattr(getattr(m, "config", None), "_attn_implementation", None) for m in mods.values()}
    if len(impls) != 1 or None in impls:
        raise FP8MixError(f"the attention modules to hook use {sorted(map(str, impls))}: expected one attention "
                          "implementation")
    impl = impls.pop()
    first = next(iter(mods.values()))
    eager = getattr(sys.modules[type(first).__module__], "eager_attention_forward", None)
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    if inner is None:
        raise FP8MixError(f"no attention function for the implementation {impl!r}")
    by_id = {id(m): hooks[name] for name, m in mods.items()}

    def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
        hook = by_id.get(id(module))
        if hook is not None:
            key, value = hook(key, value)
        return inner(module, query, key, value, attention_mask, *args, **kwargs)

    previous = ALL_ATTENTION_FUNCTIONS.get(impl)
    ALL_ATTENTION_FUNCTIONS[impl] = wrapped   # a local override on the shared instance the models read
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS[impl]
        if ALL_ATTENTION_FUNCTIONS.get(impl) is not previous:   # an enclosing override: put it back
            ALL_ATTENTION_FUNCTIONS[impl] = previous


@contextmanager
def kv_cache_quantized(model: nn.Module, scales: KVScales) -> Iterator[None]:
    """Inside the block, each attention module of ``scales`` attends over its keys and values as vLLM reads them
    from an fp8_e4m3 KV cache with that layer's k_scale and v_scale."""
    def hook_of(k_scale: torch.Tensor, v_scale: torch.Tensor) -> KVHook:
        cache: dict = {}

        def hook(key, value):
            dev = key.device
            if dev not in cache:
                cache[dev] = (k_scale.to(dev, torch.float32), v_scale.to(dev, torch.float32))
            ks, vs = cache[dev]
            return fake_quant_kv(key, ks), fake_quant_kv(value, vs)
        return hook

    with attention_hooked(model, {name: hook_of(k, v) for name, (k, v) in scales.items()}):
        yield


@torch.no_grad()
def calibrate_kv_scales(model: nn.Module, modules: list[str], batches: list[dict],
                        progress: Progress = no_progress) -> KVScales:
    """Per attention module: (k_scale, v_scale) = absmax / 448 of its post-RoPE keys and of its values over the
    calibration tokens vLLM would cache (padding, where the batch's attention_mask is 0, left out), float32 [1]
    each. No batch, or an absmax that is zero or not finite, stops with one line naming the layer."""
    if not batches:
        raise FP8MixError("no calibration batches for the FP8 KV-cache scales")
    amax = {n: [torch.zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.float32)] for n in modules}
    mask: list = [None]   # the current batch's attention_mask [B, S]

    def tokens_amax(x: torch.Tensor) -> torch.Tensor:
        a = x.detach().abs().float().amax(dim=(1, 3))   # (batch, kv heads, seq, head dim) -> [B, S]
        m = mask[0]
        if m is not None and tuple(m.shape) == tuple(a.shape):
            a = torch.where(m.to(a.device).bool(), a, torch.zeros((), dtype=a.dtype, device=a.device))
        return a.amax()

    def hook_of(name: str) -> KVHook:
        def hook(key, value):
            a = amax[name]
            a[0] = torch.maximum(a[0].to(key.device), tokens_amax(key))
            a[1] = torch.maximum(a[1].to(value.device), tokens_amax(value))
            return key, value
        return hook

    with attention_hooked(model, {n: hook_of(n) for n in modules}):
        for batch in progress(batches, "calibrating FP8 KV-cache scales"):
            mask[0] = batch.get("attention_mask")
            model(**model_inputs(batch), use_cache=False)
    for n, pair in amax.items():
        for kind, a in zip(("k_scale", "v_scale"), pair):
            if not (bool(torch.isfinite(a)) and float(a) > 0.0):
                raise FP8MixError(f"the {kind} of {n} would come from a calibrated absmax of {float(a)}; a KV-cache "
                                  "scale needs a finite, positive absmax (check the model's weights and the "
                                  "calibration data)")
    return {n: (kv_cache_scale(k.cpu()), kv_cache_scale(v.cpu())) for n, (k, v) in amax.items()}
