"""Exporters: a plan as a vLLM-loadable checkpoint (compressed-tensors by default, or ModelOpt)."""

from __future__ import annotations

from .compressed_tensors import export_checkpoint
from .modelopt import export_modelopt

FORMATS = ("compressed-tensors", "modelopt")

__all__ = ["FORMATS", "export_checkpoint", "export_modelopt"]
