"""The static vLLM rule check passes every exported scheme and catches the classic broken variants."""

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
