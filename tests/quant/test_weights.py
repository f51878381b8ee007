"""QuantizedWeights computes each module's FP8 output as the exported checkpoint serves it: under fp8_static with
the one weight scale and input scale of its fused group; per-channel and block scales stay each weight's own."""

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen2_5_VLForConditionalGeneration

from random_models import tiny_random_config
from uniform_plans import uniform_plan
from fp8mix.models import Qwen2_5_VLAdapter
from fp8mix.quant.numerics import (
    FP8Format,
    compute_weight_scale,
    fp8_linear_forward,
    quantize_input,
    quantize_weight,
    static_input_scale,
)
from fp8mix.quant.weights import QuantizedWeights

STATIC = FP8Format.fp8_static


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _inputs_of(model, name: str, batch: dict) -> torch.Tensor:
    """The activations module `name` receives in a forward on `batch`."""
    cap = {}
    h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: cap.setdefault("x", a[0].detach()))
    try:
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    finally:
        h.remove()
    return cap["x"]


# ---- the exported checkpoint, read back ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def static_checkpoint(embedded, tmp_path_factory):
    """The embedded model exported with every LM linear in fp8_static, and the calibration batches it used."""
    from fp8mix.export import export_checkpoint
    from fp8mix.score.batches import calibration_samples, make_batches
    from fp8mix.score.settings import AutoQuantSettings

    settings = AutoQuantSettings(calib_samples=4, batch_size=2, max_length=256)
    batches = make_batches(embedded.processor, calibration_samples(settings), 2, 256)
    plan = {**uniform_plan(None, "fp8_autoquant_full"), "fp8_format": STATIC.value}
    return export_checkpoint(embedded, plan, tmp_path_factory.mktemp("ckpt") / "static", batches), batches


def _read(folder, names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys() if k in names})
    return out


def test_scored_k_proj_is_the_exported_k_proj(embedded, static_checkpoint):
    """For a k_proj whose own range is smaller than its q/k/v group's, the FP8 output scoring computes equals the
    output of the checkpoint's k_proj (FP8 weight, weight_scale and input_scale read from the safetensors) on the
    same input, bit for bit, and the dequantized product to float rounding; the k_proj's own per-tensor scale (what
    scoring used before) gives another output."""
    folder, batches = static_checkpoint
    model, groups = embedded.model, embedded.layout.groups
    qw = QuantizedWeights(model, [g.modules for g in groups], STATIC)
    qw.calibrate(model, batches)
    qkv = [g for g in groups if g.kind == "qkv"]
    k_own = {g.modules[1]: compute_weight_scale(model.get_submodule(g.modules[1]).weight, STATIC) for g in qkv}
    narrower = [g.modules[1] for g in qkv if not torch.equal(k_own[g.modules[1]], qw.weights[g.modules[1]][1])]
    assert narrower, "no k_proj of the embedded model has a smaller range than its q/v: the test would prove nothing"
    k = narrower[0]

    disk = embedded.adapter.to_disk(k)
    t = _read(folder, [f"{disk}.{s}" for s in ("weight", "weight_scale", "input_scale", "bias")])
    w_fp8, w_scale, x_scale = t[f"{disk}.weight"], t[f"{disk}.weight_scale"], t[f"{disk}.input_scale"]
    bias = t.get(f"{disk}.bias")
    assert _same_bits(qw.weights[k][0], w_fp8) and _same_bits(qw.weights[k][1], w_scale)
    assert _same_bits(qw.input_scales[k], x_scale)

    x = _inputs_of(model, k, batches[0])
    scored = qw.output(k, x)
    served = fp8_linear_forward(x, w_fp8, bias, STATIC, x_scale, weight_scale=w_scale)
    assert torch.equal(scored, served)

    x_q, _ = quantize_input(x, STATIC, x_scale)
    dequantized = (x_q.double() * x_scale.double()) @ (w_fp8.double() * w_scale.double()).T
    if bias is not None:
        dequantized = dequantized + bias.double()
    torch.testing.assert_close(scored.double(), dequantized, rtol=1e-5, atol=1e-5)

    own = fp8_linear_forward(x, model.get_submodule(k).weight, model.get_submodule(k).bias, STATIC, x_scale,
                             weight_scale=k_own[k])
    assert not torch.equal(own, scored)


# ---- a fused group whose members have different ranges ----------------------------------------------------------

@pytest.fixture(scope="module")
def wide_q():
    """A random model whose layer-0 q_proj and gate_proj have 8x the range of their group neighbours."""
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_random_config()).eval()
    groups = list(Qwen2_5_VLAdapter().layout(model).groups)
    qkv = next(g for g in groups if g.kind == "qkv" and g.block == 0)
    gate_up = next(g for g in groups if g.kind == "gate_up" and g.block == 0)
    with torch.no_grad():
        for name in (qkv.modules[0], gate_up.modules[0]):
            model.get_submodule(name).weight.mul_(8)
    ids = torch.randint(0, 400, (2, 2, 12))
    batches = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]
    return model, groups, qkv, gate_up, batches


def test_static_members_share_the_widest_scale(wide_q):
    model, groups, qkv, gate_up, batches = wide_q
    qw = QuantizedWeights(model, [g.modules for g in groups], STATIC)
    qw.calibrate(model, batches)
    for group in (qkv, gate_up):
        widest = compute_weight_scale(model.get_submodule(group.modules[0]).weight, STATIC)
        for m in group.modules:
            weight = model.get_submodule(m).weight
            w_fp8, w_scale = qw.weights[m]
            assert _same_bits(w_scale, widest)
            assert _same_bits(w_fp8, quantize_weight(weight, STATIC, widest)[0])
            if m != group.modules[0]:
                assert compute_weight_scale(weight, STATIC) < widest  # its own scale, which is not used
        x_scales = [qw.input_scales[m] for m in group.modules]
        assert all(_same_bits(s, x_scales[0]) for s in x_scales)

    k = qkv.modules[1]
    x = _inputs_of(model, k, batches[0])
    mod = model.get_submodule(k)
    shared = fp8_linear_forward(x, mod.weight, mod.bias, STATIC, qw.input_scales[k], weight_scale=qw.weights[k][1])
    own = fp8_linear_forward(x, mod.weight, mod.bias, STATIC, qw.input_scales[k])
    assert torch.equal(qw.output(k, x), shared)
    assert not torch.equal(shared, own)  # what scoring computed before: k_proj on its own scale


def test_static_input_scales_are_the_groups_largest(wide_q):
    """q/k/v read one tensor, so their own input scales agree; the group's one scale is the max over members."""
    model, groups, qkv, _, batches = wide_q
    qw = QuantizedWeights(model, [g.modules for g in groups], STATIC)
    qw.calibrate(model, batches)
    absmax = torch.zeros(())
    for b in batches:
        absmax = torch.maximum(absmax, _inputs_of(model, qkv.modules[2], b).abs().amax())
    assert _same_bits(qw.input_scales[qkv.modules[2]], static_input_scale(absmax))


def test_a_group_of_one_keeps_its_own_scales(wide_q):
    model, groups, qkv, _, _ = wide_q
    qw = QuantizedWeights(model, [(m,) for m in qkv.modules], STATIC)
    for m in qkv.modules:
        assert _same_bits(qw.weights[m][1], compute_weight_scale(model.get_submodule(m).weight, STATIC))


@pytest.mark.parametrize("fmt", [FP8Format.fp8_dynamic, FP8Format.fp8_block])
def test_per_channel_and_block_scales_are_not_shared(wide_q, fmt):
    model, groups, qkv, gate_up, batches = wide_q
    qw = QuantizedWeights(model, [g.modules for g in groups], fmt)
    qw.calibrate(model, batches)
    for m in qkv.modules + gate_up.modules:
        own_fp8, own_scale = quantize_weight(model.get_submodule(m).weight, fmt)
        assert _same_bits(qw.weights[m][0], own_fp8) and _same_bits(qw.weights[m][1], own_scale)
        assert qw.input_scales[m] is None


def test_low_memory_quantizes_the_same_bytes(wide_q):
    model, groups, qkv, gate_up, batches = wide_q
    kept = QuantizedWeights(model, [g.modules for g in groups], STATIC)
    on_use = QuantizedWeights(model, [g.modules for g in groups], STATIC, cache=False)
    for m in qkv.modules + gate_up.modules:
        assert all(_same_bits(a, b) for a, b in zip(kept.weights[m], on_use.weights[m]))


def test_groups_must_be_groups(wide_q):
    model, _, qkv, _, _ = wide_q
    with pytest.raises(TypeError, match="sequences of module names"):
        QuantizedWeights(model, list(qkv.modules), STATIC)
