"""The ModelOpt writer: config keys as ModelOpt 0.47 writes them, the exclude list vLLM can match, tensors."""

import json
from fnmatch import fnmatch

import pytest
import torch

from fp8mix.errors import FP8MixError

from .export_helpers import read_safetensors, same_bits


@pytest.fixture(scope="module")
def mo_top50(embedded, top50_plan, tmp_path_factory):
    from fp8mix.export import export_modelopt

    return export_modelopt(embedded, top50_plan, tmp_path_factory.mktemp("mo") / "top50-modelopt")


def _expected_exclude(plan):
    return [("visual*" if e == "re:.*visual.*" else e) for e in plan["ignore"]]


def test_config_keys(mo_top50, top50_plan):
    cfg = json.loads((mo_top50 / "config.json").read_text())
    q = cfg["quantization_config"]
    # vLLM's ModelOptFp8Config.from_config reads the flat config.json form: quant_method, quant_algo, ignore
    assert q["quant_method"] == "modelopt" and q["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    assert set(q) == {"quant_method", "quant_algo", "ignore", "producer"}   # PCPT: no config_groups (as ModelOpt)
    assert q["ignore"] == _expected_exclude(top50_plan)
    hf = json.loads((mo_top50 / "hf_quant_config.json").read_text())
    assert hf["quantization"] == {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": None,
                                  "exclude_modules": _expected_exclude(top50_plan)}
    assert hf["producer"]["name"] == "fp8mix"
    assert cfg["dtype"] == "bfloat16"


def test_exclude_list_matches_like_vllm(mo_top50, embedded):
    """vLLM's modelopt is_layer_excluded: exact (fused shards), substring, then fnmatch; no regexes. Every vision
    linear (vLLM names visual.…) must be excluded by a wildcard, and no entry may be a regex."""
    exclude = json.loads((mo_top50 / "config.json").read_text())["quantization_config"]["ignore"]
    assert not any(e.startswith("re:") for e in exclude)
    vision = [n for n, m in embedded.model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith("model.visual.")]
    assert vision
    for name in vision:
        vllm_name = "visual." + name[len("model.visual."):]
        assert any(fnmatch(vllm_name, e) or e.rstrip("*") in vllm_name for e in exclude), vllm_name


def test_tensors(mo_top50, ct_top50, top50_plan):
    mo, ct = read_safetensors(mo_top50), read_safetensors(ct_top50)
    assert set(mo) == set(ct)
    for k, t in mo.items():
        if k.endswith(".weight_scale"):
            assert t.dtype == torch.float32 and t.shape == (ct[k].shape[0],)   # [out], not [out, 1]
            assert same_bits(t, ct[k].reshape(-1))
        else:
            assert same_bits(t, ct[k]), k          # same FP8 weights, same BF16 tensors
    assert not any(k.endswith(".input_scale") for k in mo)


def test_static_is_fp8_with_scalar_scales(embedded, static_plan, ct_static, calib_batches, tmp_path):
    from fp8mix.export import export_modelopt

    out = export_modelopt(embedded, static_plan, tmp_path / "static-modelopt", calib_batches)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_algo"] == "FP8" and q["config_groups"]["group_0"]["targets"] == ["Linear"]
    mo, ct = read_safetensors(out), read_safetensors(ct_static)
    scales = [k for k in mo if k.endswith(("weight_scale", "input_scale"))]
    assert scales and {k.rsplit(".", 1)[1] for k in scales} == {"weight_scale", "input_scale"}
    for k in scales:   # ModelOpt stores per-tensor scales as 0-d float32; same values as compressed-tensors' [1]
        assert mo[k].shape == () and mo[k].dtype == torch.float32 and same_bits(mo[k].reshape(1), ct[k])
    res = _check(out, static_plan)
    assert res["ok"], res["failures"]
    assert res["facts"]["strategy"] == "tensor" and not res["facts"]["dynamic_activations"]


def test_block_is_refused(embedded, top50_plan, tmp_path):
    from fp8mix.export import export_modelopt

    with pytest.raises(FP8MixError, match="fp8_block.*compressed-tensors"):
        export_modelopt(embedded, {**top50_plan, "fp8_format": "fp8_block"}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _check(folder, plan):
    from fp8mix.check.static import check_static
    from fp8mix.models import loading

    net, adapter = loading.build_empty(loading.EMBEDDED)
    return check_static(folder, plan, net, adapter, adapter.layout(net))


def _broken(src, dst, ignore_edit=None, tensor_edit=None):
    """A copy of a ModelOpt checkpoint with config.json's ignore list and/or its tensors edited."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if ignore_edit:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"]["ignore"] = ignore_edit(cfg["quantization_config"]["ignore"])
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensor_edit:
        for f in dst.glob("*.safetensors"):
            tensors = load_file(f)
            tensor_edit(tensors)
            save_file(tensors, f, metadata={"format": "pt"})
    return dst


def test_static_check_judges_by_vllm_modelopt_rules(mo_top50, top50_plan, tmp_path):
    """The static check reads config.json's ``ignore`` with vLLM's ModelOpt matching and wants [out] scales."""
    good = _check(mo_top50, top50_plan)
    assert good["ok"], good["failures"]
    assert good["facts"]["strategy"] == "channel" and good["facts"]["ignore_entries"] == len(top50_plan["ignore"])

    nothing = _check(_broken(mo_top50, tmp_path / "nothing", lambda ign: ign + ["model.layers.99.mlp.down_proj"]),
                     top50_plan)["failures"]
    assert any("ignore entry 'model.layers.99.mlp.down_proj' excludes no layer" in f for f in nothing)
    assert any("hf_quant_config.json's quant_algo/exclude_modules differ" in f for f in nothing)

    regex = _check(_broken(mo_top50, tmp_path / "regex",
                           lambda ign: ["re:.*visual.*" if e == "visual*" else e for e in ign]), top50_plan)["failures"]
    assert any("ignore entry 're:.*visual.*' is a regex" in f for f in regex)
    assert any("vision-tower linears are not ignored under vLLM's names" in f for f in regex)

    fp8 = "model." + top50_plan["fp8_modules"][0].removeprefix("model.language_model.")

    def column(t):
        t[fp8 + ".weight_scale"] = t[fp8 + ".weight_scale"].reshape(-1, 1)

    shape = _check(_broken(mo_top50, tmp_path / "shape", tensor_edit=column), top50_plan)["failures"]
    assert any(f"{fp8}.weight_scale has shape [" in f and "channel strategy needs" in f for f in shape)

    missing = _check(_broken(mo_top50, tmp_path / "missing", tensor_edit=lambda t: t.pop(fp8 + ".weight_scale")),
                     top50_plan)["failures"]
    assert f"{fp8} is FP8 but has no weight_scale" in missing


def test_static_check_wants_a_tied_lm_head_excluded(mo_top50, top50_plan, tmp_path):
    """vLLM's ModelOpt loader builds lm_head with the FP8 method unless the exclude list names it, tied or not; a
    tied one then runs the BF16 embedding matrix as FP8 weights with placeholder scales."""
    cfg = json.loads((mo_top50 / "config.json").read_text())
    assert cfg["tie_word_embeddings"]
    bad = _check(_broken(mo_top50, tmp_path / "no-lm-head", lambda ign: [e for e in ign if e != "lm_head"]),
                 top50_plan)["failures"]
    assert any("lm_head is not excluded" in f for f in bad), bad
