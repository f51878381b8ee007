"""FP8 KV cache numerics against a straightforward reference, and its calibration against transformers' own cache."""

from __future__ import annotations

import pytest
import torch

from fp8mix.data.samples import model_inputs
from fp8mix.errors import FP8MixError
from fp8mix.quant.kv_cache import attention_hooked, attention_modules, calibrate_kv_scales, kv_cache_quantized
from fp8mix.quant.numerics import fake_quant_kv, kv_cache_scale, quantize_kv


def _e4m3_grid() -> torch.Tensor:
    """Every finite e4m3 value, from its definition: 1 sign, 4 exponent bits (bias 7), 3 mantissa bits, no inf,
    the all-ones pattern (S.1111.111) NaN."""
    vals = set()
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue
            v = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
            vals |= {v, -v}
    return torch.tensor(sorted(vals), dtype=torch.float64)


def _reference_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """vLLM's cache write and read spelled out: x / scale in float32, saturate at +-448, nearest e4m3 value
    (ties to the even mantissa), times the scale, back to x's dtype."""
    grid = _e4m3_grid()
    y = (x.to(torch.float32) / torch.tensor(scale, dtype=torch.float32)).to(torch.float64).clamp(-448, 448)
    d = (y.reshape(-1, 1) - grid.reshape(1, -1)).abs()
    best = d.min(dim=1, keepdim=True).values
    ties = d == best
    idx = torch.arange(grid.numel()).expand_as(d)
    even = torch.tensor([int(abs(v) / 2 ** (torch.floor(torch.log2(torch.tensor(abs(v)))).clamp(min=-6) - 3)) % 2 == 0
                         if v != 0 else True for v in grid.tolist()])
    pick = torch.where(ties & even.expand_as(d), idx, grid.numel() + idx)
    pick = torch.where(ties, pick, 10 * grid.numel())
    q = grid[pick.min(dim=1).values % grid.numel()].reshape(x.shape)
    return (q.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)).to(x.dtype)


def test_fake_quant_kv_matches_the_reference_math():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 2, 37, 64, generator=g) * 3).to(torch.bfloat16)
    x[0, 0, 0, :4] = torch.tensor([1000.0, -1000.0, 0.0, 1e-6])       # saturation, zero, underflow
    scale = float(kv_cache_scale(x.float().abs().amax() * 0.5))        # half the range: some values saturate
    got = fake_quant_kv(x, scale)
    assert got.dtype == x.dtype
    assert torch.equal(got, _reference_kv(x, scale))
    assert float(got.float().abs().max()) == pytest.approx(448 * scale, rel=1e-2)
    assert quantize_kv(x, scale).dtype == torch.float8_e4m3fn


def test_kv_scale_rule_and_bad_scales():
    assert torch.equal(kv_cache_scale(4.48), torch.tensor([4.48], dtype=torch.float32) / 448)
    assert float(kv_cache_scale(0.0)) == torch.finfo(torch.float32).eps
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(FP8MixError, match="finite and positive"):
            quantize_kv(torch.ones(3), bad)


@torch.no_grad()
def test_calibration_is_the_post_rope_cache_amax_and_hooks_leave_no_trace(embedded):
    from transformers import DynamicCache

    from fp8mix.score.batches import calibration_batches
    from fp8mix.score.settings import AutoQuantSettings

    model = embedded.model
    batches, _, _ = calibration_batches(embedded.processor, AutoQuantSettings(calib_samples=4, batch_size=2))
    mods = attention_modules(embedded.layout)
    assert len(mods) == embedded.layout.n_blocks
    scales = calibrate_kv_scales(model, mods, batches)
    # reference: the keys (post-RoPE) and values transformers itself caches, padding left out
    amax = [[0.0, 0.0] for _ in mods]
    for b in batches:
        cache = DynamicCache(config=model.config)
        model(**model_inputs(b), use_cache=True, past_key_values=cache)
        real = b["attention_mask"].bool()                                # the tokens, not the padding
        for i, layer in enumerate(cache.layers):
            amax[i][0] = max(amax[i][0], float(layer.keys.abs().amax(dim=(1, 3))[real].max()))
            amax[i][1] = max(amax[i][1], float(layer.values.abs().amax(dim=(1, 3))[real].max()))
    for i, m in enumerate(mods):
        assert float(scales[m][0]) * 448 == pytest.approx(amax[i][0], rel=1e-6)
        assert float(scales[m][1]) * 448 == pytest.approx(amax[i][1], rel=1e-6)

    inputs = model_inputs(batches[0])
    ref = model(**inputs, use_cache=False).logits
    with attention_hooked(model, {m: (lambda k, v: (k, v)) for m in mods}):
        assert torch.equal(model(**inputs, use_cache=False).logits, ref)   # pass-through is exact
    with kv_cache_quantized(model, scales):
        quant = model(**inputs, use_cache=False).logits
    assert not torch.equal(quant, ref)                                      # the cache is quantized
    assert torch.equal(model(**inputs, use_cache=False).logits, ref)       # and restored on exit


@torch.no_grad()
def test_quantized_attention_is_attention_over_reference_quantized_keys_and_values(embedded):
    """kv_cache_quantized gives every layer the output it has over keys and values quantized by the reference."""
    from fp8mix.score.batches import calibration_batches
    from fp8mix.score.settings import AutoQuantSettings

    model = embedded.model
    mods = attention_modules(embedded.layout)
    batches, _, _ = calibration_batches(embedded.processor, AutoQuantSettings(calib_samples=2, batch_size=2))
    inputs = model_inputs(batches[0])
    scales = {m: (torch.tensor([0.004 * (i + 1)]), torch.tensor([0.003 * (i + 1)])) for i, m in enumerate(mods)}

    def reference(m):
        ks, vs = (float(t) for t in scales[m])
        return lambda k, v: (_reference_kv(k, ks), _reference_kv(v, vs))

    with attention_hooked(model, {m: reference(m) for m in mods}):
        want = model(**inputs, use_cache=False).logits
    with kv_cache_quantized(model, scales):
        got = model(**inputs, use_cache=False).logits
    assert torch.equal(got, want)
    assert not torch.equal(got, model(**inputs, use_cache=False).logits)


def _right_padded(batch: dict, ids: torch.Tensor) -> dict:
    """``batch`` with ``ids`` appended as right padding: attention mask 0, no image, no label."""
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], ids], 1)
    for k, fill in (("attention_mask", 0), ("mm_token_type_ids", 0), ("labels", -100)):
        if k in batch:
            out[k] = torch.cat([batch[k], torch.full(ids.shape, fill, dtype=batch[k].dtype)], 1)
    return out


@torch.no_grad()
def test_calibration_counts_only_the_tokens_vllm_caches_not_padding(embedded):
    """vLLM's cache holds a request's own tokens only: whatever sits at padded positions leaves the scales as they
    are without the padding."""
    from fp8mix.score.batches import calibration_batches
    from fp8mix.score.settings import AutoQuantSettings

    model = embedded.model
    mods = attention_modules(embedded.layout)
    batches, _, _ = calibration_batches(embedded.processor, AutoQuantSettings(calib_samples=2, batch_size=2))
    batch = batches[0]
    want = calibrate_kv_scales(model, mods, [batch])
    ids = torch.randint(0, 5000, (batch["input_ids"].shape[0], 64), generator=torch.Generator().manual_seed(0))
    got = calibrate_kv_scales(model, mods, [_right_padded(batch, ids)])
    for m in mods:
        assert torch.equal(got[m][0], want[m][0]) and torch.equal(got[m][1], want[m][1]), m


@torch.no_grad()
def test_calibration_without_tokens_or_with_zero_or_nan_amax_stops(embedded):
    from fp8mix.score.batches import calibration_batches
    from fp8mix.score.settings import AutoQuantSettings

    model = embedded.model
    mods = attention_modules(embedded.layout)
    batches, _, _ = calibration_batches(embedded.processor, AutoQuantSettings(calib_samples=2, batch_size=2))
    with pytest.raises(FP8MixError, match="no calibration"):
        calibrate_kv_scales(model, mods, [])
    v = model.get_submodule(mods[1] + ".v_proj")
    saved = (v.weight.detach().clone(), v.bias.detach().clone())
    try:
        v.weight.zero_()
        v.bias.zero_()
        with pytest.raises(FP8MixError, match=f"v_scale of {mods[1]}.*0"):
            calibrate_kv_scales(model, mods, batches)
        v.weight[0, 0] = float("nan")
        with pytest.raises(FP8MixError, match=f"v_scale of {mods[1]}.*nan"):
            calibrate_kv_scales(model, mods, batches)
    finally:
        v.weight.copy_(saved[0])
        v.bias.copy_(saved[1])
