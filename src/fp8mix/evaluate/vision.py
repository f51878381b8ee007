"""The vision tower's outputs, computed once per batch of images and reused by every model the eval runs.

Every scheme keeps the vision tower BF16, so BF16 and each scheme feed the language model the same image
embeddings from the same pixels: the same kernels on the same inputs give the same numbers, computed once instead
of once per model. ``VisionReuse`` wraps the ``get_image_features`` of the module that holds the vision tower
(transformers' Qwen-VL models call it from their forward, for teacher-forced passes and for the prefill of
``generate``) with a cache keyed on the pixel tensor itself (weakly held: an entry goes with its batch). A scheme
whose checkpoint changes anything in the vision tower runs inside ``suspended(True)``: it computes its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["VisionReuse", "touches"]


def touches(names: list[str], vision_path: str) -> bool:
    """Whether any of the parameter or module names lies in the vision tower at `vision_path`."""
    return bool(vision_path) and any(n == vision_path or n.startswith(vision_path + ".") for n in names)


class VisionReuse:
    """``with VisionReuse(model, vision_path):`` image features are computed once per pixel tensor; ``hits``
    counts the reuses. A model without a vision tower, or whose vision tower's holder has no
    ``get_image_features``, runs as it is."""

    def __init__(self, model: nn.Module, vision_path: str):
        holder = model.get_submodule(vision_path.rpartition(".")[0]) if vision_path else None
        self.holder = holder if holder is not None and hasattr(holder, "get_image_features") else None
        self.cache: dict[int, tuple[weakref.ref, object, object]] = {}  # id(pixels) -> (pixels ref, grid, output)
        self.off = False
        self.hits = 0

    def __enter__(self) -> "VisionReuse":
        if self.holder is not None:
            original = self.holder.get_image_features

            def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
                if self.off or set(kwargs) - {"return_dict"}:
                    return original(pixel_values, image_grid_thw, **kwargs)
                key = id(pixel_values)
                entry = self.cache.get(key)
                if entry is not None and entry[0]() is pixel_values and entry[1] is image_grid_thw:
                    self.hits += 1
                    return entry[2]
                out = original(pixel_values, image_grid_thw, **kwargs)
                self.cache[key] = (weakref.ref(pixel_values, lambda r, k=key: self._drop(k, r)), image_grid_thw, out)
                return out

            self.holder.get_image_features = get_image_features  # the instance's, over the class's method
        return self

    def __exit__(self, *_exc) -> None:
        if self.holder is not None:
            del self.holder.get_image_features
        self.cache.clear()

    def _drop(self, key: int, ref: weakref.ref) -> None:
        if self.cache.get(key, (None,))[0] is ref:
            del self.cache[key]

    @contextmanager
    def suspended(self, off: bool = True) -> Iterator[None]:
        """Inside, with `off`, every image is encoded afresh and nothing is cached."""
        old, self.off = self.off, self.off or off
        try:
            yield
        finally:
            self.off = old
