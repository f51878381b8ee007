"""Model families fp8mix supports, and loading a model with its processor."""

from __future__ import annotations

from .base import GROUP_KINDS, FamilyAdapter, KeptPart, LinearGroup, ModelLayout
from .qwen2_5_vl import Qwen2_5_VLAdapter

ADAPTERS: tuple[type[FamilyAdapter], ...] = (Qwen2_5_VLAdapter,)

__all__ = ["ADAPTERS", "GROUP_KINDS", "FamilyAdapter", "KeptPart", "LinearGroup", "ModelLayout",
           "Qwen2_5_VLAdapter", "adapter_for", "supported_architectures"]


def supported_architectures() -> list[str]:
    return [a for cls in ADAPTERS for a in cls.architectures]


def adapter_for(architecture: str) -> FamilyAdapter:
    from ..errors import FP8MixError

    for cls in ADAPTERS:
        if architecture in cls.architectures:
            return cls()
    raise FP8MixError(f"unsupported architecture {architecture!r}; supported: {', '.join(supported_architectures())}")
