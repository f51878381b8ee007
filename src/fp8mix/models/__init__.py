"""Model families fp8mix supports, and loading a model with its processor."""

from __future__ import annotations

from .base import GROUP_KINDS, FamilyAdapter, KeptPart, LinearGroup, ModelLayout
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS: tuple[type[FamilyAdapter], ...] = (Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter)
# Architectures of the supported families' relatives that fp8mix does not handle, and why (one line each)
NOT_SUPPORTED = {
    "Qwen3VLMoeForConditionalGeneration": "Qwen3-VL MoE is not supported: fp8mix scores and plans the "
                                          "dense LM linears, and its experts are fused expert tensors",
}

__all__ = ["ADAPTERS", "GROUP_KINDS", "FamilyAdapter", "KeptPart", "LinearGroup", "ModelLayout",
           "Qwen2_5_VLAdapter", "Qwen2VLAdapter", "Qwen3VLAdapter", "adapter_for", "supported_architectures",
           "supported_families"]


def supported_architectures() -> list[str]:
    return [a for cls in ADAPTERS for a in cls.architectures]


def supported_families() -> str:
    """'Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration), …': what fp8mix supports, for one-line errors."""
    return ", ".join(f"{cls.title} ({', '.join(cls.architectures)})" for cls in ADAPTERS)


def adapter_for(architecture: str) -> FamilyAdapter:
    from ..errors import FP8MixError

    for cls in ADAPTERS:
        if architecture in cls.architectures:
            return cls()
    why = NOT_SUPPORTED.get(architecture, f"unsupported architecture {architecture!r}")
    raise FP8MixError(f"{why}; supported: {supported_families()}")
