"""The static vLLM rule check passes every exported scheme and catches the classic broken variants."""

import json

from .check_helpers import broken_copy, plan_of
from fp8mix.check.static import check_static
from fp8mix.plan.catalog import load_catalog


def test_every_exported_scheme_passes(check_run, skeleton):
    net, adapter, layout = skeleton
    for name in load_catalog()[0].schemes:
        res = check_static(check_run.run / "checkpoints" / name, plan_of(check_run.run, name), net, adapter, layout)
        assert res["ok"], (name, res["failures"])


def _some_fp8_block(plan):
    return plan["fp8_blocks"][0]


def test_q_proj_ignored_alone_is_caught(check_run, skeleton, tmp_path):
    net, adapter, layout = skeleton
    plan = plan_of(check_run.run, "fp8_autoquant_full")
    q = f"model.layers.{_some_fp8_block(plan)}.self_attn.q_proj"
    bad = broken_copy(check_run.run / "checkpoints" / "fp8_autoquant_full", tmp_path / "bad",
                      ignore_edit=lambda ign: ign + [q], bf16_modules=[q])
    res = check_static(bad, plan, net, adapter, layout)
    assert not res["ok"]
    text = " | ".join(res["failures"])
    assert f"fused group model.layers.{_some_fp8_block(plan)}.self_attn.qkv mixes FP8 (k_proj, v_proj) and BF16 (q_proj)" in text
    assert "ignore list splits fused group" in text


def test_vision_regex_in_one_naming_is_caught(check_run, skeleton, tmp_path):
    net, adapter, layout = skeleton
    plan = plan_of(check_run.run, "fp8_autoquant_top50")
    bad = broken_copy(check_run.run / "checkpoints" / "fp8_autoquant_top50", tmp_path / "bad",
                      ignore_edit=lambda ign: [e if e != "re:.*visual.*" else r"re:model\.visual\..*" for e in ign])
    res = check_static(bad, plan, net, adapter, layout)
    assert not res["ok"]
    text = " | ".join(res["failures"])
    assert r"ignore entry 're:model\\.visual\\..*' matches no module under vLLM's names" in text
    assert "vision-tower linears are not ignored under vLLM's names" in text


def test_ignore_entry_matching_nothing_is_caught(check_run, skeleton, tmp_path):
    net, adapter, layout = skeleton
    plan = plan_of(check_run.run, "fp8_autoquant_top25")
    bad = broken_copy(check_run.run / "checkpoints" / "fp8_autoquant_top25", tmp_path / "bad",
                      ignore_edit=lambda ign: ign + ["model.layers.99.mlp.down_proj"])
    res = check_static(bad, plan, net, adapter, layout)
    assert "ignore entry 'model.layers.99.mlp.down_proj' matches no module in either HF naming" in res["failures"]


def test_missing_processor_file_is_caught(check_run, skeleton, tmp_path):
    net, adapter, layout = skeleton
    plan = plan_of(check_run.run, "fp8_autoquant_top25")
    bad = broken_copy(check_run.run / "checkpoints" / "fp8_autoquant_top25", tmp_path / "bad")
    (bad / "preprocessor_config.json").unlink()
    res = check_static(bad, plan, net, adapter, layout)
    assert any("preprocessor_config.json is missing" in f for f in res["failures"])


def test_fp8_kv_cache_scales_and_scheme_are_checked(check_run, skeleton, tmp_path):
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    net, adapter, layout = skeleton
    name = "fp8_autoquant_full_kv"
    src = check_run.run / "checkpoints" / name
    plan = plan_of(check_run.run, name)
    good = check_static(src, plan, net, adapter, layout)
    assert good["ok"], good["failures"]
    assert good["facts"]["kv_cache"] == "fp8" and good["facts"]["kv_scales"] == 2 * layout.n_blocks

    def broken(tag, edit_tensors=None, edit_scheme=None):
        dst = shutil.copytree(src, tmp_path / tag)
        if edit_tensors:
            f = dst / "model.safetensors"
            t = load_file(f)
            edit_tensors(t)
            save_file(t, f, metadata={"format": "pt"})
        if edit_scheme:
            cfg = json.loads((dst / "config.json").read_text())
            edit_scheme(cfg["quantization_config"])
            (dst / "config.json").write_text(json.dumps(cfg))
        return " | ".join(check_static(dst, plan, net, adapter, layout)["failures"])

    assert "model.layers.1.self_attn.v_scale is missing" in broken(
        "missing", lambda t: t.pop("model.layers.1.self_attn.v_scale"))
    assert "model.layers.0.self_attn.k_scale is -1.0: a KV-cache scale must be finite and positive" in broken(
        "negative", lambda t: t.__setitem__("model.layers.0.self_attn.k_scale", torch.tensor([-1.0])))
    assert "model.layers.0.self_attn.k_scale is nan" in broken(
        "nan", lambda t: t.__setitem__("model.layers.0.self_attn.k_scale", torch.tensor([float("nan")])))
    assert "kv_cache_scheme.strategy is 'channel'" in broken(
        "strategy", edit_scheme=lambda qc: qc["kv_cache_scheme"].__setitem__("strategy", "channel"))
    assert "the plan asks for an FP8 KV cache but config.json has no kv_cache_scheme" in broken(
        "undeclared", edit_scheme=lambda qc: qc.__setitem__("kv_cache_scheme", None))


VLLM_IGNORED = """
import json, sys
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.layers.quantization.compressed_tensors.utils import should_ignore_layer
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as M
qc, layers = json.loads(sys.stdin.read())
cfg = CompressedTensorsConfig.from_config(qc)
cfg.apply_vllm_mapper(M.hf_to_vllm_mapper.get_rename_mapper())
cfg.packed_modules_mapping.update(M.packed_modules_mapping)
print(json.dumps([should_ignore_layer(p, ignore=cfg.ignore, fused_mapping=cfg.packed_modules_mapping) for p in layers]))
"""


def test_plain_ignore_name_is_an_exact_module_name(check_run, skeleton, tmp_path):
    """vLLM's compressed-tensors ignore matches a plain name exactly (no prefix): a block's name leaves its
    linears quantized, so a checkpoint that keeps them BF16 under such an entry fails the check."""
    import subprocess

    from fp8mix.check.live import vllm_python

    net, adapter, layout = skeleton
    plan = plan_of(check_run.run, "fp8_autoquant_top50")
    block = next(b for b in range(layout.n_blocks) if b not in plan["fp8_blocks"])
    bad = broken_copy(check_run.run / "checkpoints" / "fp8_autoquant_top50", tmp_path / "bad",
                      ignore_edit=lambda ign: [e for e in ign if f".layers.{block}." not in e] + [f"model.layers.{block}"])
    res = check_static(bad, plan, net, adapter, layout)
    assert not res["ok"]
    assert f"ignore entry 'model.layers.{block}' matches no module in either HF naming" in res["failures"]
    assert f"model.layers.{block}.mlp.down_proj is BF16 but not ignored: vLLM would expect FP8 weights for it" \
        in res["failures"]
    if vllm_python() is None:
        return
    qc = json.loads((bad / "config.json").read_text())["quantization_config"]
    layers = [f"language_model.model.layers.{block}.{m}" for m in ("self_attn.qkv_proj", "mlp.down_proj")]
    out = subprocess.run([vllm_python(), "-c", VLLM_IGNORED], input=json.dumps([qc, layers]), text=True,
                         check=True, capture_output=True, timeout=300).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [False, False]   # vLLM quantizes them
