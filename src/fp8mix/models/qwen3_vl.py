"""Qwen3-VL, dense (Qwen3VLForConditionalGeneration).

The LM blocks are Qwen3's: q/k/v/o and gate/up/down linears (fused by vLLM as qkv_proj and gate_up_proj) and
RMSNorms on the query and key heads (q_norm, k_norm), which are not linears and stay BF16 untouched. The vision
tower (``model.visual``) holds the patch embedding, the blocks, the patch merger and the deepstack mergers whose
outputs are added to the first LM blocks' hidden states: all of it stays BF16.

Qwen3-VL checkpoints have one on-disk naming, the in-memory one (``model.language_model.*``, ``model.visual.*``):
transformers 5 loads no other, and vLLM's hf_to_vllm_mapper maps only that one.
"""

from __future__ import annotations

from torch import nn

from .base import FamilyAdapter


class Qwen3VLAdapter(FamilyAdapter):
    family = "qwen3_vl"
    title = "Qwen3-VL"
    architectures = ("Qwen3VLForConditionalGeneration",)
    processor_class = "Qwen3VLProcessor"
    blocks_path = "model.language_model.layers"
    vision_path = "model.visual"
    embed_path = "model.language_model.embed_tokens"
    disk_prefixes = ()
    # vLLM's Qwen3VLForConditionalGeneration.hf_to_vllm_mapper
    vllm_prefixes = (("model.language_model", "language_model.model"), ("model.visual", "visual"),
                     ("lm_head", "language_model.lm_head"))
    vision_ignore = "re:.*visual.*"

    def vision_reason(self, model: nn.Module) -> str:
        n = len(model.config.vision_config.deepstack_visual_indexes or ())
        return f"vision tower with its patch merger and {n} deepstack mergers: kept BF16 (the report covers the " \
               "language model)"
