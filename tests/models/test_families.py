"""Qwen2-VL and Qwen3-VL adapters on small random models: groups as vLLM fuses them, what stays BF16, the on-disk
namings transformers reads and writes, the processors, and the one-line refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2VLForConditionalGeneration, Qwen3VLForConditionalGeneration

from fp8mix.data import shapes
from fp8mix.data.samples import encode
from fp8mix.errors import FP8MixError
from fp8mix.models import GROUP_KINDS, adapter_for, loading
from fp8mix.models.processor import load_processor, save_processor
from random_models import qwen2_vl_config, qwen3_vl_config, random_model_folder

CLASSES = {"qwen2_vl": (Qwen2VLForConditionalGeneration, qwen2_vl_config),
           "qwen3_vl": (Qwen3VLForConditionalGeneration, qwen3_vl_config)}


@pytest.fixture(scope="module", params=list(CLASSES))
def folder(request, tmp_path_factory):
    cls, config = CLASSES[request.param]
    return random_model_folder(tmp_path_factory.mktemp(request.param), config(tie_word_embeddings=True))


@pytest.mark.parametrize("family", list(CLASSES))
@pytest.mark.parametrize("tied", [False, True])
def test_layout_groups_and_kept_parts(family, tied):
    cls, config = CLASSES[family]
    model = cls(config(tie_word_embeddings=tied))
    ad = adapter_for(cls.__name__)
    lay = ad.layout(model)
    assert lay.family == family and lay.n_blocks == 3 and len(lay.groups) == 12
    assert [g.kind for g in lay.groups_of_block(1)] == list(GROUP_KINDS)
    qkv = lay.group("model.language_model.layers.1.self_attn.qkv")
    assert qkv.shapes == ((128, 128), (64, 128), (64, 128))  # 2 query heads, 1 KV head of 64
    # every linear of the blocks is in exactly one group; the q/k norms are no linears and stay out
    assert sorted(m for g in lay.groups for m in g.modules) == sorted(ad.all_lm_linears(model))
    assert not any("norm" in m for g in lay.groups for m in g.modules)
    if family == "qwen3_vl":
        attn = model.get_submodule("model.language_model.layers.1.self_attn")
        assert type(attn.q_norm).__name__.endswith("RMSNorm") and type(attn.k_norm).__name__.endswith("RMSNorm")
    # the vision tower, with every merger (Qwen3-VL: the deepstack ones too), is one BF16 part
    vision = ad.vision_linears(model)
    mergers = [n for n in vision if "merger" in n]
    assert len(mergers) == (2 if family == "qwen2_vl" else 2 + 2 * 2), mergers
    assert all(n.startswith("model.visual.") for n in vision)
    kept = {p.name: p for p in lay.kept_bf16}
    assert set(kept) == {"model.visual", "model.language_model.embed_tokens", "lm_head"}
    assert kept["model.visual"].params == sum(p.numel() for p in model.model.visual.parameters())
    assert lay.tied_lm_head == tied and kept["lm_head"].params == (0 if tied else 8192 * 128)
    assert lay.total_params == sum(p.numel() for p in model.parameters())  # a tied head is counted once
    if family == "qwen3_vl":
        assert "2 deepstack mergers" in kept["model.visual"].reason
    facts = ad.plan_facts(model)
    assert facts["family"] == ad.title and facts["always_ignore"] == ["re:.*visual.*", "lm_head"]


def test_qwen2_vl_reads_both_namings_and_writes_the_hub_one(tmp_path):
    """transformers writes Qwen2-VL in the hub layout (model.layers.N, visual.*) and reads both; the adapter maps
    each disk name to the module it loads into, and vLLM's mapper takes either naming to the same vLLM name."""
    model = Qwen2VLForConditionalGeneration(qwen2_vl_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hub")
    disk = load_file(tmp_path / "hub" / "model.safetensors")
    ad = adapter_for("Qwen2VLForConditionalGeneration")
    memory = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" in disk and "visual.merger.mlp.0.weight" in disk
    for name in disk:
        assert ad.to_memory(name) in memory and ad.to_disk(ad.to_memory(name)) == name
    # the newer naming (model.language_model.*, model.visual.*) loads the same weights
    new = {ad.to_memory(k): v for k, v in disk.items()}
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    save_file(new, tmp_path / "new" / "model.safetensors", metadata={"format": "pt"})
    again = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "new", dtype=torch.bfloat16)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in memory.items())
    assert ad.to_vllm("model.layers.2.mlp.down_proj") == "language_model.model.layers.2.mlp.down_proj"
    assert ad.to_vllm("visual.blocks.0.attn.qkv") == "visual.blocks.0.attn.qkv"


def test_qwen3_vl_has_one_naming_and_refuses_the_legacy_one(tmp_path):
    """Qwen3-VL is saved as it sits in memory (model.language_model.*, model.visual.*, with the deepstack mergers);
    transformers does not read the Qwen2-VL-style names, so a checkpoint in them is one clear error."""
    model = Qwen3VLForConditionalGeneration(qwen3_vl_config()).to(torch.bfloat16)
    folder = random_model_folder(tmp_path / "m", qwen3_vl_config())
    disk = load_file(folder / "model.safetensors")
    ad = adapter_for("Qwen3VLForConditionalGeneration")
    assert set(disk) == set(model.state_dict())
    assert "model.visual.deepstack_merger_list.1.linear_fc2.weight" in disk
    assert all(ad.to_disk(ad.to_memory(k)) == k for k in disk)
    assert ad.to_vllm("model.language_model.layers.0.self_attn.q_proj") == \
        "language_model.model.layers.0.self_attn.q_proj"
    assert ad.to_vllm("model.visual.deepstack_merger_list.0.linear_fc1") == "visual.deepstack_merger_list.0.linear_fc1"
    legacy = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
              for k, v in disk.items()}
    save_file(legacy, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FP8MixError, match=r"weights missing from the checkpoint \(first: model\.language_model\."):
        loading.load(str(folder))


def test_processor_has_the_family_class_and_saves_the_stock_one(folder, tmp_path):
    arch = loading.architecture(loading.read_config(folder))
    stock = adapter_for(arch).processor_class
    proc = load_processor(folder)
    assert type(proc).__mro__[1].__name__ == stock
    s = shapes.sample("eval", 0)
    enc = encode(proc, [s])
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    patch = proc.image_processor.patch_size
    t, h, w = enc["image_grid_thw"][0].tolist()
    assert (t, patch) == (1, 16 if stock == "Qwen3VLProcessor" else 14)
    assert int((enc["input_ids"] == pad).sum()) == h * w // 4  # 2x2 patches merged into one token
    save_processor(proc, tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == stock
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    again = encode(load_processor(tmp_path), [s])
    assert again["input_ids"].equal(enc["input_ids"]) and again["pixel_values"].equal(enc["pixel_values"])


def test_moe_and_other_architectures_get_one_line():
    with pytest.raises(FP8MixError, match="Qwen3-VL MoE is not supported.*supported: Qwen2.5-VL .*Qwen2-VL .*Qwen3-VL"):
        adapter_for("Qwen3VLMoeForConditionalGeneration")
    with pytest.raises(FP8MixError, match=r"unsupported architecture 'LlamaForCausalLM'; supported: .*Qwen3VL"):
        adapter_for("LlamaForCausalLM")
