"""Plans: the FP8/BF16 decision for every fused linear group, for one catalog scheme.

A plan is a pure function of the scores file (sensitivity.json or scores/<key>.json) and the catalog: the scores
file carries the groups (blocks, kinds, modules, parameters, scores) and the model facts a plan needs
(`model_layout`: every LM linear, its on-disk name, the ignore entries that always stay), so planning never loads
or builds the model."""

from __future__ import annotations

from ..errors import FP8MixError
from .catalog import Catalog
from .solver import solve_budget


def blocks_for_fraction(fraction: float, n_blocks: int) -> int:
    """Whole blocks for a fraction: round half up, at least one block."""
    return max(1, min(n_blocks, int(fraction * n_blocks + 0.5)))


def model_layout(sens: dict) -> dict:
    """The scores file's model facts, checked against its groups."""
    facts = sens.get("model_layout")
    if not facts:
        raise FP8MixError("the scores file has no model_layout (written by an older fp8mix); "
                          "rerun fp8mix score --force")
    linears = set(facts["lm_linears"])
    if any(m not in linears for g in sens["groups"] for m in g["modules"]):
        raise FP8MixError("the scores file's groups name linears its model_layout does not have; rerun fp8mix score")
    return facts


def choose_groups(rule, sens: dict) -> set[str]:
    groups, n_blocks = sens["groups"], sens["n_blocks"]
    if rule.blocks_fraction is not None:
        k = blocks_for_fraction(rule.blocks_fraction, n_blocks)
        chosen = {b["block"] for b in sens["blocks"] if b["rank"] < k}
        return {g["name"] for g in groups if g["block"] in chosen}
    if rule.granularity == "group":
        pick = solve_budget([g["score"] for g in groups], [g["params"] for g in groups], rule.effective_bits)
        return {g["name"] for g, on in zip(groups, pick) if on}
    blocks = list(range(n_blocks))
    scores = [sum(g["score"] for g in groups if g["block"] == b) for b in blocks]
    params = [sum(g["params"] for g in groups if g["block"] == b) for b in blocks]
    pick = solve_budget(scores, params, rule.effective_bits)
    return {g["name"] for g in groups if pick[g["block"]]}


def plan_scheme(name: str, catalog: Catalog, sens: dict) -> dict:
    scheme = catalog.schemes[name]
    facts = model_layout(sens)
    groups, n_blocks, all_linears = sens["groups"], sens["n_blocks"], facts["lm_linears"]
    fp8_groups = choose_groups(scheme.rule, sens)
    fp8_modules = sorted(m for g in groups if g["name"] in fp8_groups for m in g["modules"])
    bf16_modules = sorted(set(all_linears) - set(fp8_modules))
    fp8_params = sum(g["params"] for g in groups if g["name"] in fp8_groups)
    total = sum(g["params"] for g in groups)
    blocks_fp8 = sorted(b for b in range(n_blocks)
                        if all(g["name"] in fp8_groups for g in groups if g["block"] == b))
    # Each BF16 linear by its on-disk name (what vLLM maps) and its in-memory name (what transformers matches
    # when it reloads the checkpoint without dequantizing); the vision tower by a regex that matches in every naming.
    ignore = sorted({facts["disk_names"][m] for m in bf16_modules} | set(bf16_modules)) + list(facts["always_ignore"])
    by_name = {g["name"]: g for g in groups}
    # the KV-cache key only where a scheme asks for one: plans of the other schemes keep their bytes
    kv = {"kv_cache": scheme.kv_cache} if scheme.kv_cache is not None else {}
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
            "blocks_total": n_blocks,
            "groups_fp8": len(fp8_groups),
            "groups_total": len(groups),
            "linears_fp8": len(fp8_modules),
            "linears_total": len(all_linears),
            "lm_params_fp8_fraction": fp8_params / total,
        },
        "effective_bits": 16.0 - 8.0 * fp8_params / total,
        "target_effective_bits": catalog.target_bits(name),
        "predicted_loss_increase": sum(by_name[g]["score"] for g in sorted(fp8_groups)),
        **kv,
    }
