"""A checkpoint is evaluated in place: its FP8 layers swap in, other differing tensors are copied in, and the
model is the BF16 one again afterwards."""

import torch
from safetensors.torch import load_file, save_file

from fp8mix.evaluate.checkpoint import scheme_applied
from fp8mix.quant.numerics import FP8Linear
from uniform_plans import uniform_plan


def test_scheme_swaps_in_and_back(embedded, tmp_path):
    from fp8mix.export import export_checkpoint

    plan = uniform_plan(None)
    ckpt = export_checkpoint(None, plan, tmp_path / "full")
    model = embedded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a non-FP8 tensor that differs from the model's must be the checkpoint's inside the block
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    key = "model.norm.weight"
    tensors[key] = tensors[key] * 2
    save_file(tensors, f, metadata={"format": "pt"})
    with scheme_applied(model, ckpt, embedded.adapter) as fp8:
        assert fp8 == plan["fp8_modules"] and len(fp8) == 7 * embedded.layout.n_blocks
        assert all(isinstance(model.get_submodule(m), FP8Linear) for m in fp8)
        norm = model.get_submodule("model.language_model.norm").weight
        assert torch.equal(norm, before["model.language_model.norm.weight"] * 2)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, FP8Linear) for m in model.modules())


def test_kv_cache_checkpoint_missing_a_layers_scales_is_an_error(embedded, tmp_path):
    """vLLM runs every LM attention layer of a kv_cache_scheme checkpoint with an fp8 cache, a layer without stored
    scales at 1.0; emulating that layer without quantization would measure another model."""
    import pytest

    from fp8mix.errors import FP8MixError
    from fp8mix.export import export_checkpoint
    from fp8mix.quant.kv_cache import attention_modules

    plan = uniform_plan(None, "fp8_autoquant_full_kv")
    mods = attention_modules(embedded.layout)
    kv = {m: (torch.tensor([0.02]), torch.tensor([0.01])) for m in mods}
    ckpt = export_checkpoint(None, plan, tmp_path / "full_kv", kv_scales=kv)
    with scheme_applied(embedded.model, ckpt, embedded.adapter):
        pass
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    base = embedded.adapter.to_disk(mods[1])
    del tensors[base + ".k_scale"], tensors[base + ".v_scale"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(FP8MixError, match=f"{mods[1]} has no k_scale"):
        with scheme_applied(embedded.model, ckpt, embedded.adapter):
            pass
