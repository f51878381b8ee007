"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)."""

from __future__ import annotations

from torch import nn

from .base import FamilyAdapter


class Qwen2_5_VLAdapter(FamilyAdapter):
    family = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    processor_class = "Qwen2_5_VLProcessor"
    blocks_path = "model.language_model.layers"
    vision_path = "model.visual"
    embed_path = "model.language_model.embed_tokens"
    lm_head_path = "lm_head"
    # transformers 5 keeps the hub layout on disk: model.layers.N…, visual.…, lm_head.
    disk_prefixes = (("model.language_model", "model"), ("model.visual", "visual"))
    # vLLM's Qwen2_5_VLForConditionalGeneration (hf_to_vllm_mapper): model.X -> language_model.model.X
    vllm_prefixes = (("model", "language_model.model"), ("visual", "visual"), ("lm_head", "language_model.lm_head"))
    vision_ignore = "re:.*visual.*"

    def vision_reason(self, model: nn.Module) -> str:
        width = model.config.vision_config.intermediate_size
        why = "vision tower: kept BF16 (the report covers the language model)"
        if width % 16:
            why += f"; its MLP width {width} is not a multiple of 16, which FP8 kernels need"
        return why
