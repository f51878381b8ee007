"""Plans: the FP8/BF16 decision for every fused linear group, for one catalog scheme."""

from __future__ import annotations

from ..errors import FP8MixError
from ..models import FamilyAdapter, ModelLayout
from .catalog import Catalog
from .solver import solve_budget


def blocks_for_fraction(fraction: float, n_blocks: int) -> int:
    """Whole blocks for a fraction: round half up, at least one block."""
    return max(1, min(n_blocks, int(fraction * n_blocks + 0.5)))


def _check_matches(sens: dict, layout: ModelLayout) -> dict[str, dict]:
    by_name = {g["name"]: g for g in sens["groups"]}
    expected = {g.name for g in layout.groups}
    if set(by_name) != expected:
        raise FP8MixError("sensitivity.json does not match this model's linear groups; rerun fp8mix score")
    return by_name


def choose_groups(rule, sens: dict, layout: ModelLayout) -> set[str]:
    by_name = _check_matches(sens, layout)
    if rule.blocks_fraction is not None:
        k = blocks_for_fraction(rule.blocks_fraction, layout.n_blocks)
        chosen = {b["block"] for b in sens["blocks"] if b["rank"] < k}
        return {g.name for g in layout.groups if g.block in chosen}
    if rule.granularity == "group":
        items = list(layout.groups)
        pick = solve_budget([by_name[g.name]["score"] for g in items], [g.params for g in items], rule.effective_bits)
        return {g.name for g, on in zip(items, pick) if on}
    blocks = list(range(layout.n_blocks))
    scores = [sum(by_name[g.name]["score"] for g in layout.groups_of_block(b)) for b in blocks]
    params = [sum(g.params for g in layout.groups_of_block(b)) for b in blocks]
    pick = solve_budget(scores, params, rule.effective_bits)
    return {g.name for g in layout.groups if pick[g.block]}


def plan_scheme(name: str, catalog: Catalog, sens: dict, layout: ModelLayout, adapter: FamilyAdapter,
                all_linears: list[str]) -> dict:
    scheme = catalog.schemes[name]
    by_name = _check_matches(sens, layout)
    fp8_groups = choose_groups(scheme.rule, sens, layout)
    fp8_modules = sorted(m for g in layout.groups if g.name in fp8_groups for m in g.modules)
    bf16_modules = sorted(set(all_linears) - set(fp8_modules))
    fp8_params = sum(g.params for g in layout.groups if g.name in fp8_groups)
    total = layout.lm_linear_params
    blocks_fp8 = sorted(b for b in range(layout.n_blocks)
                        if all(g.name in fp8_groups for g in layout.groups_of_block(b)))
    # Each BF16 linear by its on-disk name (what vLLM maps) and its in-memory name (what transformers matches
    # when it reloads the checkpoint without dequantizing); the vision tower by a regex that matches in every naming.
    ignore = sorted({adapter.to_disk(m) for m in bf16_modules} | set(bf16_modules)) + [adapter.vision_ignore,
                                                                                       adapter.lm_head_path]
    return {
        "scheme": name,
        "catalog_version": catalog.version,
        "rule": scheme.rule.model_dump(exclude_none=True),
        "rationale": scheme.rationale,
        "fp8_format": (scheme.fp8_format or catalog.defaults.fp8_format).value,
        "settings_key": sens["settings_key"],
        "fp8_groups": sorted(fp8_groups),
        "fp8_blocks": blocks_fp8,
        "fp8_modules": fp8_modules,
        "bf16_modules": bf16_modules,
        "ignore": ignore,
        "coverage": {
            "blocks_fp8": len(blocks_fp8),
            "blocks_total": layout.n_blocks,
            "groups_fp8": len(fp8_groups),
            "groups_total": len(layout.groups),
            "linears_fp8": len(fp8_modules),
            "linears_total": len(all_linears),
            "lm_params_fp8_fraction": fp8_params / total,
        },
        "effective_bits": 16.0 - 8.0 * fp8_params / total,
        "target_effective_bits": catalog.target_bits(name),
        "predicted_loss_increase": sum(by_name[g]["score"] for g in sorted(fp8_groups)),
    }
