"""Small random Qwen2.5-VL configs built inside the tests, and what a random model folder needs besides weights."""

from pathlib import Path


def tiny_random_config(**text):
    """A small random Qwen2.5-VL config built inside the tests (different sizes from the embedded model)."""
    from transformers import Qwen2_5_VLConfig

    t = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    t.update(text)
    return Qwen2_5_VLConfig(
        text_config=t,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=60, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503,
        tie_word_embeddings=t["tie_word_embeddings"])


def add_embedded_processor(folder: Path) -> None:
    """Copy the embedded model's processor, tokenizer, chat template and generation config (the files the export
    carries along: AUX_FILES) into a folder of random weights, so that it exports and loads like a real one."""
    import shutil

    from fp8mix.export.folder import AUX_FILES
    from fp8mix.models.loading import EMBEDDED

    for pattern in AUX_FILES:
        for f in EMBEDDED.glob(pattern):
            if f.is_file() and not (Path(folder) / f.name).exists():
                shutil.copy(f, folder)


# ---- Qwen2-VL and Qwen3-VL: small random model folders that load, export and serve like real ones ---------------
# Dimensions vLLM's CPU build runs in FP8: LM widths multiples of 16, 64-wide attention heads. The embedded model's
# tokenizer (its token ids below) and the family's own image-processor settings (Qwen2-VL: 14-pixel patches and
# CLIP normalisation; Qwen3-VL: 16-pixel patches, mean/std 0.5, at least 256x256 pixels) as the published
# checkpoints' preprocessor_config.json hold them.


def _token_ids():
    import json

    from fp8mix.models.loading import EMBEDDED

    cfg = json.loads((EMBEDDED / "config.json").read_text())
    text = cfg["text_config"]
    ids = {k: cfg[k] for k in ("image_token_id", "video_token_id")}
    ids.update({k: cfg.get(k, text.get(k)) for k in ("vision_start_token_id", "vision_end_token_id")})
    return ids, {k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def qwen2_vl_config(tie_word_embeddings=False, **text):
    from transformers import Qwen2VLConfig

    ids, special = _token_ids()
    t = dict(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=tie_word_embeddings,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}, **special)
    t.update(text)
    return Qwen2VLConfig(text_config=t, vision_config=dict(depth=2, embed_dim=64, hidden_size=t["hidden_size"],
                                                           mlp_ratio=2, num_heads=2, patch_size=14),
                         tie_word_embeddings=tie_word_embeddings, **ids)


def qwen3_vl_config(tie_word_embeddings=False, **text):
    from transformers import Qwen3VLConfig

    ids, special = _token_ids()
    t = dict(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=tie_word_embeddings,
             rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [12, 10, 10],
                              "mrope_interleaved": True}, **special)
    t.update(text)
    return Qwen3VLConfig(text_config=t, vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                                                           out_hidden_size=t["hidden_size"], patch_size=16,
                                                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
                         tie_word_embeddings=tie_word_embeddings, **ids)


PREPROCESSORS = {
    "Qwen2VLForConditionalGeneration": dict(
        patch_size=14, image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        min_pixels=3136, max_pixels=12845056, processor_class="Qwen2VLProcessor"),
    "Qwen3VLForConditionalGeneration": dict(
        patch_size=16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], size={"shortest_edge": 65536,
                                                                                   "longest_edge": 16777216},
        processor_class="Qwen3VLProcessor"),
}


def random_model_folder(folder: Path, config, seed: int = 0) -> Path:
    """A folder holding a random model of `config` (BF16 safetensors as transformers saves them) with the embedded
    model's tokenizer and generation config, the family's preprocessor_config.json and chat template."""
    import json
    import shutil

    import torch
    import transformers

    from fp8mix.models.loading import EMBEDDED
    from fp8mix.models.processor import CHAT_TEMPLATE, DEFAULT_TEMPLATES

    cls = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
           "qwen3_vl": transformers.Qwen3VLForConditionalGeneration}[config.model_type]
    arch = cls.__name__
    torch.manual_seed(seed)
    model = cls(config).to(torch.bfloat16).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(EMBEDDED / name, folder / name)
    pre = dict(PREPROCESSORS[arch])
    processor_class = pre["processor_class"]
    size = pre.pop("size", None) or {"shortest_edge": pre.pop("min_pixels"), "longest_edge": pre.pop("max_pixels")}
    pre.update(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True, merge_size=2, resample=3,
               rescale_factor=1 / 255, temporal_patch_size=2, image_processor_type="Qwen2VLImageProcessor", size=size)
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True) + "\n")
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["processor_class"] = processor_class
    (folder / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")
    (folder / "chat_template.jinja").write_text(DEFAULT_TEMPLATES.get(processor_class, CHAT_TEMPLATE))
    return folder
