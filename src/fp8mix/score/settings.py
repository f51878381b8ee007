"""AutoQuant scoring settings: one validated object, hashed to name its cached scores."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..data.samples import DEFAULT_MAX_LENGTH, DEFAULT_MAX_PIXELS
from ..quant.numerics import FP8Format


# Raised whenever the same settings would give other scores, so that cached scores of older code are not reused.
# 2: batches carry mm_token_type_ids (M-RoPE positions); fp8_static uses the fused groups' shared scales.
# 3: the KL method sums over the text positions (as eval counts them), no longer over every attended position.
SCORING_VERSION = 3


class AutoQuantSettings(BaseModel):
    """What decides a scoring pass's result. Equal settings share one pass."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["gradient", "kl_div"] = "gradient"
    calib_samples: int = Field(128, ge=1, le=100_000)
    seed: int = Field(0, ge=0)
    with_images: bool = True
    fp8_format: FP8Format = FP8Format.fp8_dynamic
    batch_size: int = Field(8, ge=1, le=4096)
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=16)   # tokens per sample; longer samples are dropped (counted)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=28 * 28)  # larger images are scaled down first
    data: str = "embedded"
    data_digest: str | None = None  # a local file or folder's samples (data.sources.digest); None: built-in data

    def key(self, model_fingerprint: str) -> str:
        """A short hash of the settings, the model and the scoring code's version: the cache name of the scores
        they produce."""
        doc = json.dumps({"model": model_fingerprint, "scoring_version": SCORING_VERSION,
                          **self.model_dump(mode="json", exclude_none=True)}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:16]
