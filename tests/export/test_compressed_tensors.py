"""The compressed-tensors writer: reload parity, bitwise BF16 tensors, ignore list, atomicity, static scales."""

import json

import pytest
import torch

from fp8mix.errors import FP8MixError
from fp8mix.quant.numerics import (
    FP8Format,
    FP8Linear,
    compute_weight_scale,
    dequantize_weight,
    fake_quant_input,
    quantize_weight,
    static_input_scale,
)

from .export_helpers import disk_name, read_safetensors, restrict_plan, same_bits

def _set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


@pytest.fixture(scope="module")
def fixed_batch(embedded):
    """Two embedded samples with images (the vision tower runs too), padded to one batch."""
    from fp8mix.score.batches import calibration_samples, make_batches
    from fp8mix.score.settings import AutoQuantSettings

    samples = calibration_samples(AutoQuantSettings(calib_samples=2, seed=7))
    batch = make_batches(embedded.processor, samples, 2, 256)[0]
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.fixture(scope="module")
def source_tensors(embedded):
    return read_safetensors(embedded.path)


def test_reload_parity(ct_top50, top50_plan, fixed_batch, source_tensors, embedded):
    """transformers reloads the checkpoint (compressed-tensors decompresses every FP8 weight) and, with vLLM's
    per-token FP8 activation quantization on the layers the checkpoint stores in FP8, computes fp8mix's
    fake-quant model.

    Reload path: transformers 5.23 ``from_pretrained(..., quantization_config=CompressedTensorsConfig(
    dequantize=True))`` (CompressedTensorsDequantize: fp8 -> float32 * weight_scale, per checkpoint tensor).
    The default path is covered by test_default_reload_keeps_bf16_layers_bf16.

    Everything runs in float32 (exact for BF16 weights and FP8 values). Four levels:
    0. the stored FP8 weights and scales are bitwise quantize_weight's (FP8Linear.from_linear's buffers);
    1. weights after reload: bitwise equal (FP8 modules: fp8mix's dequantized FP8 weight; all others: the BF16 source);
    2. each FP8 layer, fed the same input: equal to float32 rounding. fp8mix computes (sum x_q*w_q) * (s_x*s_w),
       the reloaded layer sum (x_q*s_x)*(w_q*s_w): elementwise |diff| <= 16 eps32 * sum|x||w| (+ eps32 |bias|),
       measured ~4 eps32;
    3. logits: those float32 differences (~1e-7 relative) occasionally move a later activation across an FP8
       rounding boundary, and a flip is a whole FP8 step (up to 1/8 of the value), so the end-to-end difference is
       chaotic rather than ~1e-7: on this model max |d logit| ~0.16 for logits ~26. It is bounded in distribution:
       mean KL(fake quant || reload) <= 0.3 x mean KL(fake quant || BF16) (measured ~0.1x) and top-1 >= 95%.
    """
    from transformers import CompressedTensorsConfig, Qwen2_5_VLForConditionalGeneration

    from fp8mix.models import loading

    fmt = FP8Format(top50_plan["fp8_format"])
    fp8 = sorted(top50_plan["fp8_modules"])
    eps = torch.finfo(torch.float32).eps

    # fp8mix's fake quant: the plan's FP8 modules replaced by FP8Linear (float32 model on the BF16 weights)
    ref = loading.load(None, dtype=torch.float32).model
    for name in fp8:
        _set_module(ref, name, FP8Linear.from_linear(ref.get_submodule(name), fmt))

    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        ct_top50, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    stored_fp8 = {k[: -len(".weight_scale")] for k in read_safetensors(ct_top50) if k.endswith(".weight_scale")}
    assert stored_fp8 == {disk_name(m) for m in fp8}

    # 0. the stored FP8 weights and scales are quantize_weight's (what FP8Linear.from_linear holds)
    stored = read_safetensors(ct_top50)
    for m in fp8:
        assert same_bits(stored[disk_name(m) + ".weight"], ref.get_submodule(m).weight), m
        assert same_bits(stored[disk_name(m) + ".weight_scale"], ref.get_submodule(m).weight_scale), m

    # 1. weights after reload
    for name, p in back.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in set(fp8) and name.endswith(".weight"):
            w_fp8, scale = stored[disk_name(name)], stored[disk_name(module) + ".weight_scale"]
            assert same_bits(p.data, dequantize_weight(w_fp8, scale, fmt, torch.float32)), name
        else:
            assert same_bits(p.data, source_tensors[disk_name(name)].float()), name

    # 2. each FP8 layer on fp8mix's own inputs
    inputs = {}
    handles = [ref.get_submodule(m).register_forward_pre_hook(
        lambda _mod, args, m=m: inputs.__setitem__(m, args[0].detach())) for m in fp8]
    with torch.no_grad():
        want = ref(**fixed_batch, use_cache=False).logits
        for h in handles:
            h.remove()
        for m in fp8:
            x, layer = inputs[m], back.get_submodule(m)
            xq = fake_quant_input(x, fmt)
            got = torch.nn.functional.linear(xq, layer.weight, layer.bias)
            bound = 16 * eps * (xq.abs() @ layer.weight.abs().T)
            if layer.bias is not None:
                bound = bound + eps * layer.bias.abs()
            assert ((ref.get_submodule(m)(x) - got).abs() <= bound).all(), m

    # 3. logits, with vLLM's dynamic per-token activation quantization on the reloaded FP8 layers
    for m in fp8:
        back.get_submodule(m).register_forward_pre_hook(lambda _mod, args: (fake_quant_input(args[0], fmt),))
    with torch.no_grad():
        got = back(**fixed_batch, use_cache=False).logits
        bf16 = embedded.model(**fixed_batch, use_cache=False).logits
    mask = fixed_batch["attention_mask"].bool()
    logp = torch.log_softmax(want[mask], -1)

    def kl(other):
        return (logp.exp() * (logp - torch.log_softmax(other[mask], -1))).sum(-1).mean().item()

    assert kl(got) <= 0.3 * kl(bf16), (kl(got), kl(bf16))
    assert (want[mask].argmax(-1) == got[mask].argmax(-1)).float().mean() >= 0.95


def test_non_fp8_tensors_are_the_source_bits(ct_top50, top50_plan, source_tensors):
    out = read_safetensors(ct_top50)
    fp8_weights = {disk_name(m) + ".weight" for m in top50_plan["fp8_modules"]}
    scales = {disk_name(m) + s for m in top50_plan["fp8_modules"] for s in (".weight_scale",)}
    assert set(out) == set(source_tensors) | scales          # same names (legacy layout), plus the scales
    for name, t in out.items():
        if name in fp8_weights:
            assert t.dtype == torch.float8_e4m3fn
        elif name in scales:
            assert t.dtype == torch.float32 and t.shape == (source_tensors[name[:-6]].shape[0], 1)
        else:
            assert t.dtype == torch.bfloat16 and same_bits(t, source_tensors[name]), name
    assert any(n.startswith("visual.") for n in out) and not any(n.startswith("model.language_model") for n in out)


def test_config_ignore_is_the_plans(ct_top50, top50_plan):
    cfg = json.loads((ct_top50 / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["ignore"] == top50_plan["ignore"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "float-quantized"
    assert q["quantization_status"] == "compressed"
    (group,) = q["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["type"] == "float"
    assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
    assert cfg["dtype"] == "bfloat16" and cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]


def test_side_files_and_marker(ct_top50, top50_plan):
    from fp8mix.export.marker import plan_sha256, read_marker

    for name in ("preprocessor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (ct_top50 / name).is_file(), name
    pre = json.loads((ct_top50 / "preprocessor_config.json").read_text())
    assert pre["processor_class"] == "Qwen2_5_VLProcessor" and "patch_size" in pre
    marker = read_marker(ct_top50)
    assert marker["plan_sha256"] == plan_sha256(top50_plan) and marker["format"] == "compressed-tensors"
    assert not list(ct_top50.parent.glob(f".{ct_top50.name}.*"))   # no staging leftovers


def test_failure_leaves_nothing(embedded, top50_plan, tmp_path, monkeypatch):
    from fp8mix.export import compressed_tensors as ct

    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ct, "write_side_files", boom)   # after the weights and config were written
    dest = tmp_path / "ckpt"
    plan = restrict_plan(top50_plan, {top50_plan["fp8_blocks"][0]})
    with pytest.raises(RuntimeError, match="disk full"):
        ct.export_checkpoint(embedded, plan, dest)
    assert not dest.exists() and list(tmp_path.iterdir()) == []

    # a previous checkpoint survives a failed re-export untouched
    from fp8mix.export import jobs

    monkeypatch.setattr(jobs, "write_tensors", boom)
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        ct.export_checkpoint(embedded, plan, dest)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"] and (dest / "config.json").read_text() == "{}"


def test_partial_fused_group_is_refused(embedded, top50_plan, tmp_path):
    from fp8mix.export import export_checkpoint

    fp8 = [m for m in top50_plan["fp8_modules"] if not m.endswith("k_proj")]
    with pytest.raises(FP8MixError, match="only part of the fused group"):
        export_checkpoint(embedded, {**top50_plan, "fp8_modules": fp8}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_static_shares_scales_within_fused_groups(ct_static, static_plan, embedded, calib_batches,
                                                  source_tensors):
    fmt = FP8Format.fp8_static
    out = read_safetensors(ct_static)
    # the calibration rule, spelled out: input_scale = max |x| over every calibration token / 448
    absmax = {m: torch.zeros(()) for m in static_plan["fp8_modules"]}
    handles = [embedded.model.get_submodule(m).register_forward_pre_hook(
        lambda _mod, args, m=m: absmax.__setitem__(m, torch.maximum(absmax[m], args[0].abs().amax().float())))
        for m in absmax]
    with torch.no_grad():
        for batch in calib_batches:
            embedded.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    for h in handles:
        h.remove()
    groups = [g for g in embedded.layout.groups if g.name in set(static_plan["fp8_groups"])]
    assert {g.kind for g in groups} == {"qkv", "o", "gate_up", "down"}
    for g in groups:
        disk = [disk_name(m) for m in g.modules]
        w_scales = [out[d + ".weight_scale"] for d in disk]
        x_scales = [out[d + ".input_scale"] for d in disk]
        for s in w_scales + x_scales:
            assert s.dtype == torch.float32 and s.shape == (1,)
        assert all(same_bits(s, w_scales[0]) for s in w_scales)
        assert all(same_bits(s, x_scales[0]) for s in x_scales)
        # one scale per group: the max of the members' own
        own_w = torch.stack([compute_weight_scale(source_tensors[d + ".weight"], fmt) for d in disk])
        assert same_bits(w_scales[0], own_w.amax().reshape(1))
        own_x = torch.stack([static_input_scale(absmax[m]) for m in g.modules])
        assert same_bits(x_scales[0], own_x.amax().reshape(1))
        if len(disk) > 1 and not torch.equal(own_w.amin(), own_w.amax()):
            assert torch.isin(w_scales[0], own_w.reshape(-1)).all()  # it is one member's scale
        for d in disk:
            w_fp8, _ = quantize_weight(source_tensors[d + ".weight"], fmt, scale=w_scales[0])
            assert same_bits(out[d + ".weight"], w_fp8)
    q = json.loads((ct_static / "config.json").read_text())["quantization_config"]
    (group,) = q["config_groups"].values()
    assert group["weights"]["strategy"] == "tensor" and group["input_activations"]["dynamic"] is False


def test_static_needs_calibration(embedded, static_plan, tmp_path):
    from fp8mix.export import export_checkpoint

    with pytest.raises(FP8MixError, match="calibration"):
        export_checkpoint(embedded, static_plan, tmp_path / "x")


def test_block_scales(embedded, top50_plan, tmp_path, source_tensors):
    from fp8mix.export import export_checkpoint

    plan = {**restrict_plan(top50_plan, {top50_plan["fp8_blocks"][0]}), "fp8_format": "fp8_block"}
    out = read_safetensors(export_checkpoint(None, plan, tmp_path / "block"))
    name = disk_name(plan["fp8_modules"][0])
    w = source_tensors[name + ".weight"]
    assert out[name + ".weight_scale"].shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
    assert same_bits(out[name + ".weight_scale"], quantize_weight(w, FP8Format.fp8_block)[1])


def test_ignore_list_must_match_the_fp8_modules(embedded, top50_plan, tmp_path):
    from fp8mix.export import export_checkpoint

    first_fp8 = disk_name(top50_plan["fp8_modules"][0])
    with pytest.raises(FP8MixError, match="ignore list covers it"):
        export_checkpoint(embedded, {**top50_plan, "ignore": [first_fp8, *top50_plan["ignore"]]}, tmp_path / "x")
    bf16 = disk_name(top50_plan["bf16_modules"][0])
    with pytest.raises(FP8MixError, match="vLLM would quantize it"):
        export_checkpoint(embedded, {**top50_plan, "ignore": [e for e in top50_plan["ignore"] if e != bf16]},
                          tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_quantization_config_is_what_the_compressor_writes(top50_plan, tmp_path):
    """Same dict as ModelCompressor.update_config for that QuantizationConfig (no model walk, so no automatic
    ignore list replacing the plan's)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    from fp8mix.export.compressed_tensors import quantization_config
    from fp8mix.quant.numerics import scheme_for

    (tmp_path / "config.json").write_text("{}")
    qcfg = QuantizationConfig(config_groups={"group_0": scheme_for("fp8_dynamic", ["Linear"])},
                              ignore=top50_plan["ignore"], format="float-quantized",
                              quantization_status=QuantizationStatus.COMPRESSED)
    ModelCompressor(quantization_config=qcfg).update_config(str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert json.loads(json.dumps(quantization_config(top50_plan))) == written


def test_default_reload_keeps_bf16_layers_bf16(ct_top50, top50_plan):
    """transformers' plain from_pretrained matches `ignore` against in-memory names: the plan lists each BF16
    linear in both namings, so those layers stay unquantized and no scale is reported missing."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ct_top50, dtype=torch.bfloat16, output_loading_info=True)
    model, info = model
    assert not info["missing_keys"], info["missing_keys"][:5]
    for name in top50_plan["bf16_modules"]:
        mod = model.get_submodule(name)
        assert getattr(mod, "quantization_scheme", None) is None, name
        assert mod.weight.dtype == torch.bfloat16
    for name in top50_plan["fp8_modules"]:
        assert getattr(model.get_submodule(name), "quantization_scheme", None) is not None, name
