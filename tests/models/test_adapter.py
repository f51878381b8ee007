import torch
from safetensors import safe_open
from transformers import Qwen2_5_VLForConditionalGeneration

from random_models import tiny_random_config
from fp8mix.models import GROUP_KINDS, Qwen2_5_VLAdapter, adapter_for


def test_embedded_layout(embedded):
    lay = embedded.layout
    assert lay.n_blocks == 8 and len(lay.groups) == 32
    assert [g.kind for g in lay.groups_of_block(3)] == list(GROUP_KINDS)
    qkv = lay.groups_of_block(3)[0]
    assert qkv.name == "model.language_model.layers.3.self_attn.qkv"
    assert [m.rsplit(".", 1)[1] for m in qkv.modules] == ["q_proj", "k_proj", "v_proj"]
    assert qkv.shapes == ((256, 256), (128, 256), (128, 256))  # GQA: k/v narrower than q
    assert lay.tied_lm_head
    # every linear inside the blocks belongs to exactly one group
    grouped = sorted(m for g in lay.groups for m in g.modules)
    assert grouped == sorted(embedded.adapter.all_lm_linears(embedded.model))
    assert lay.total_params == sum(p.numel() for p in embedded.model.parameters())
    assert {p.name for p in lay.kept_bf16} == {"model.visual", "model.language_model.embed_tokens", "lm_head"}


def test_random_model_layout_untied_and_odd_vision_width():
    model = Qwen2_5_VLForConditionalGeneration(tiny_random_config())
    ad = adapter_for("Qwen2_5_VLForConditionalGeneration")
    lay = ad.layout(model)
    assert lay.n_blocks == 3 and len(lay.groups) == 12
    assert not lay.tied_lm_head
    head = [p for p in lay.kept_bf16 if p.name == "lm_head"][0]
    assert head.params == 512 * 64
    vision = [p for p in lay.kept_bf16 if p.name == "model.visual"][0]
    assert "60 is not a multiple of 16" in vision.reason
    gate_up = lay.group("model.language_model.layers.2.mlp.gate_up")
    assert gate_up.params == 2 * 160 * 64


def test_name_mapping_matches_what_transformers_writes(tmp_path):
    model = Qwen2_5_VLForConditionalGeneration(tiny_random_config(tie_word_embeddings=True)).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ad = Qwen2_5_VLAdapter()
    memory = dict(model.state_dict())
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        disk = list(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in disk and "visual.blocks.0.attn.qkv.weight" in disk
    for name in disk:
        assert ad.to_memory(name) in memory, name
        assert ad.to_disk(ad.to_memory(name)) == name
    assert ad.to_disk("model.language_model.layers.5.mlp.down_proj") == "model.layers.5.mlp.down_proj"
    assert ad.to_disk("model.visual.merger.mlp.0") == "visual.merger.mlp.0"
    assert ad.to_disk("lm_head") == "lm_head"


def test_unsupported_architecture_lists_supported():
    import pytest

    from fp8mix.errors import FP8MixError

    with pytest.raises(FP8MixError, match="Qwen2_5_VLForConditionalGeneration"):
        adapter_for("LlamaForCausalLM")
