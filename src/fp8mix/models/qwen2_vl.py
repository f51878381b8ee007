"""Qwen2-VL (Qwen2VLForConditionalGeneration): the Qwen2.5-VL layout with a LayerNorm/GELU vision tower."""

from __future__ import annotations

from .base import FamilyAdapter


class Qwen2VLAdapter(FamilyAdapter):
    family = "qwen2_vl"
    title = "Qwen2-VL"
    architectures = ("Qwen2VLForConditionalGeneration",)
    processor_class = "Qwen2VLProcessor"
    blocks_path = "model.language_model.layers"
    vision_path = "model.visual"       # patch embedding, blocks and the patch merger
    embed_path = "model.language_model.embed_tokens"
    # transformers 5 reads both namings and writes the hub's: model.layers.N…, visual.…, lm_head.
    disk_prefixes = (("model.language_model", "model"), ("model.visual", "visual"))
    # vLLM's Qwen2VLForConditionalGeneration.hf_to_vllm_mapper (either naming): model.X -> language_model.model.X
    vllm_prefixes = (("model", "language_model.model"), ("visual", "visual"), ("lm_head", "language_model.lm_head"))
    vision_ignore = "re:.*visual.*"
