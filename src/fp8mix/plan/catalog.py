"""The scheme catalog: a versioned YAML file, validated on load."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import FP8MixError
from ..quant.numerics import FP8Format
from ..score.settings import AutoQuantSettings

DEFAULT_CATALOG = Path(__file__).resolve().parents[1] / "catalog" / "default.yaml"
ALWAYS_BF16 = ("vision_tower", "lm_head", "embeddings")


class AutoQuantOverrides(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["gradient", "kl_div"] | None = None
    calib_samples: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0)
    with_images: bool | None = None
    batch_size: int | None = Field(None, ge=1)
    max_length: int | None = Field(None, ge=16)
    max_pixels: int | None = Field(None, ge=28 * 28)


class Rule(BaseModel):
    """Exactly one of: blocks_fraction (whole blocks, least sensitive first) or effective_bits (exact budget)."""

    model_config = ConfigDict(extra="forbid")
    blocks_fraction: float | None = Field(None, gt=0.0, le=1.0)
    effective_bits: float | None = Field(None, ge=8.0, le=16.0)
    granularity: Literal["group", "block"] = "block"

    @model_validator(mode="after")
    def _one_rule(self):
        if (self.blocks_fraction is None) == (self.effective_bits is None):
            raise ValueError("a rule needs exactly one of blocks_fraction or effective_bits")
        if self.blocks_fraction is not None and self.granularity != "block":
            raise ValueError("blocks_fraction chooses whole blocks: granularity must be 'block'")
        return self

    def describe(self) -> str:
        if self.blocks_fraction is not None:
            return f"least-sensitive {self.blocks_fraction:.0%} of LM blocks"
        return f"<= {self.effective_bits:g} effective bits, by {self.granularity}"


class Scheme(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rule: Rule
    rationale: str = Field(min_length=1)
    fp8_format: FP8Format | None = None
    autoquant: AutoQuantOverrides = AutoQuantOverrides()
    target_effective_bits: float | None = Field(None, ge=8.0, le=16.0)
    # "fp8": the checkpoint declares an FP8 (e4m3) KV cache with calibrated per-layer k/v scales
    # (compressed-tensors kv_cache_scheme); absent: the KV cache stays in the model dtype
    kv_cache: Literal["fp8"] | None = None


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fp8_format: FP8Format = FP8Format.fp8_dynamic
    autoquant: AutoQuantOverrides = AutoQuantOverrides()


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    defaults: Defaults = Defaults()
    always_bf16: list[Literal["vision_tower", "lm_head", "embeddings"]] = list(ALWAYS_BF16)
    schemes: dict[str, Scheme] = Field(min_length=1)

    @model_validator(mode="after")
    def _checks(self):
        missing = set(ALWAYS_BF16) - set(self.always_bf16)
        if missing:
            raise ValueError(f"always_bf16 must list {sorted(ALWAYS_BF16)}; missing {sorted(missing)} "
                             "(the vision tower, embeddings and lm_head are never quantized)")
        for name in self.schemes:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"scheme name {name!r}: use letters, digits, '_' and '-' (it names files)")
            if name.casefold() == "bf16":  # eval, check and bench call the BF16 source so; files named so too
                raise ValueError(f"scheme name {name!r} is the BF16 source's name in eval, check and bench; "
                                 "choose another")
        return self

    def settings(self, name: str, **overrides) -> AutoQuantSettings:
        """The AutoQuant settings of a scheme: catalog defaults, then the scheme's own, then the caller's."""
        scheme = self.schemes[name]
        merged = {k: v for k, v in self.defaults.autoquant.model_dump().items() if v is not None}
        merged.update({k: v for k, v in scheme.autoquant.model_dump().items() if v is not None})
        merged["fp8_format"] = scheme.fp8_format or self.defaults.fp8_format
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return AutoQuantSettings(**merged)

    def target_bits(self, name: str) -> float:
        """The scheme's target effective bits: stated, the budget, or what a blocks fraction implies."""
        s = self.schemes[name]
        if s.target_effective_bits is not None:
            return s.target_effective_bits
        if s.rule.effective_bits is not None:
            return s.rule.effective_bits
        return 16.0 - 8.0 * s.rule.blocks_fraction


def load_catalog(path: str | Path | None = None) -> tuple[Catalog, Path]:
    path = Path(path) if path else DEFAULT_CATALOG
    if not path.is_file():
        raise FP8MixError(f"catalog {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise FP8MixError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise FP8MixError(f"{path}: a catalog is a mapping with version, defaults, always_bf16 and schemes")
    try:
        return Catalog(**raw), path
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "catalog"
        raise FP8MixError(f"{path}: {loc}: {err['msg']}") from None
