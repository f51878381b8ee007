import itertools
import random

import pytest

from fp8mix.errors import FP8MixError
from fp8mix.models import loading
from fp8mix.plan.catalog import Rule, load_catalog
from fp8mix.plan.planner import blocks_for_fraction, choose_groups, plan_scheme
from fp8mix.plan.solver import solve_budget


@pytest.fixture(scope="module")
def skeleton():
    net, adapter = loading.build_empty(loading.EMBEDDED)
    return net, adapter, adapter.layout(net)


def _sens(skeleton, block_scores, spread=None):
    net, adapter, layout = skeleton
    rng = random.Random(1)
    groups = []
    for g in layout.groups:
        s = block_scores[g.block] * (spread[g.kind] if spread else 0.25) * (1 + 0.01 * rng.random())
        groups.append({"name": g.name, "block": g.block, "kind": g.kind, "modules": list(g.modules),
                       "params": g.params, "score": s})
    totals = {b: sum(x["score"] for x in groups if x["block"] == b) for b in range(layout.n_blocks)}
    order = sorted(totals, key=lambda b: (totals[b], b))
    return {"settings_key": "k", "groups": groups, "n_blocks": layout.n_blocks, "model_layout": adapter.plan_facts(net),
            "blocks": [{"block": b, "score": totals[b], "rank": order.index(b)} for b in totals]}


@pytest.mark.parametrize("n, fractions, want", [(36, (0.25, 0.5, 1.0), (9, 18, 36)), (8, (0.25, 0.5, 1.0), (2, 4, 8)),
                                                (28, (0.25,), (7,)), (3, (0.25, 0.5), (1, 2)), (10, (0.25,), (3,))])
def test_fraction_rounds_half_up(n, fractions, want):
    assert tuple(blocks_for_fraction(f, n) for f in fractions) == want


def test_fraction_rule_takes_least_sensitive_whole_blocks(skeleton):
    _, _, layout = skeleton
    sens = _sens(skeleton, [9, 1, 5, 0.5, 3, 4, 8, 2])
    chosen = choose_groups(Rule(blocks_fraction=0.25), sens)
    assert {layout.group(n).block for n in chosen} == {3, 1}
    assert len(chosen) == 8  # whole blocks: 2 x 4 groups


def test_fraction_ties_broken_by_block_index(skeleton):
    _, _, layout = skeleton
    sens = _sens(skeleton, [1.0] * 8)
    for b in sens["blocks"]:
        b["rank"] = b["block"]
    chosen = choose_groups(Rule(blocks_fraction=0.5), sens)
    assert {layout.group(n).block for n in chosen} == {0, 1, 2, 3}


def test_solver_is_exact_against_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        n = 10
        scores = [rng.random() ** 3 for _ in range(n)]
        params = [rng.choice([1, 2, 4, 8]) * 1000 for _ in range(n)]
        bits = rng.uniform(8, 15)
        need = (16 - bits) / 8 * sum(params)
        best = min((sum(s for s, on in zip(scores, pick) if on), pick)
                   for pick in itertools.product([0, 1], repeat=n)
                   if sum(p for p, on in zip(params, pick) if on) >= need - 1e-9)
        got = solve_budget(scores, params, bits)
        assert sum(p for p, on in zip(params, got) if on) >= need - 1e-6
        assert sum(s for s, on in zip(scores, got) if on) == pytest.approx(best[0], rel=1e-6, abs=1e-12)


def test_plans_never_split_fused_groups_and_ignore_is_vllm_safe(skeleton):
    net, adapter, layout = skeleton
    catalog, _ = load_catalog()
    sens = _sens(skeleton, [9, 1, 5, 0.5, 3, 4, 8, 2], {"qkv": 0.4, "o": 0.1, "gate_up": 0.3, "down": 0.2})
    linears = adapter.all_lm_linears(net)
    for name, scheme in catalog.schemes.items():
        plan = plan_scheme(name, catalog, sens)
        fp8 = set(plan["fp8_modules"])
        for g in layout.groups:
            assert set(g.modules) <= fp8 or not set(g.modules) & fp8, g.name
        assert sorted(fp8 | set(plan["bf16_modules"])) == sorted(linears)
        assert "re:.*visual.*" in plan["ignore"] and "lm_head" in plan["ignore"]
        explicit = [i for i in plan["ignore"] if i not in ("re:.*visual.*", "lm_head")]
        assert not any(i.endswith(("qkv", "gate_up", "qkv_proj", "gate_up_proj")) for i in explicit)  # unfused
        disk = [i for i in explicit if i.startswith("model.layers.")]
        memory = [i for i in explicit if i.startswith("model.language_model.layers.")]
        assert sorted(disk) == sorted(adapter.to_disk(m) for m in plan["bf16_modules"])
        assert sorted(memory) == sorted(plan["bf16_modules"]) and len(disk) + len(memory) == len(explicit)
        if scheme.rule.effective_bits is not None:
            assert plan["effective_bits"] <= scheme.rule.effective_bits + 1e-9
    full = plan_scheme("fp8_autoquant_full", catalog, sens)
    assert full["effective_bits"] == 8.0 and full["coverage"]["blocks_fp8"] == 8
    bits12 = plan_scheme("fp8_autoquant_bits12", catalog, sens)
    top50 = plan_scheme("fp8_autoquant_top50", catalog, sens)
    # group granularity can only do as well as, or better than, whole blocks at the same budget
    assert bits12["predicted_loss_increase"] <= top50["predicted_loss_increase"] + 1e-12


@pytest.mark.parametrize("text, message", [
    ("version: 1\nschemes: {a: {rule: {blocks_fraction: 0.5, effective_bits: 12}, rationale: x}}", "exactly one"),
    ("version: 1\nschemes: {a: {rule: {}, rationale: x}}", "exactly one"),
    ("version: 1\nschemes: {a: {rule: {blocks_fraction: 1.5}, rationale: x}}", "less than or equal to 1"),
    ("version: 1\nschemes: {a: {rule: {blocks_fraction: 0.5}, rationale: x, colour: red}}", "colour"),
    ("version: 1\nalways_bf16: [lm_head]\nschemes: {a: {rule: {blocks_fraction: 0.5}, rationale: x}}", "missing"),
    ("version: 1\nschemes: {a: {rule: {blocks_fraction: 0.5}, rationale: x}\n", "not valid YAML"),
    ("version: 1\nschemes: {a: {rule: {effective_bits: 6}, rationale: x}}", "greater than or equal to 8"),
    ("version: 1\nschemes: {BF16: {rule: {blocks_fraction: 0.5}, rationale: x}}", "BF16 source's name"),
])
def test_bad_catalogs_get_one_clear_error(tmp_path, text, message):
    f = tmp_path / "cat.yaml"
    f.write_text(text)
    with pytest.raises(FP8MixError, match=message) as exc:
        load_catalog(f)
    assert str(f) in str(exc.value)


def test_scheme_settings_merge_defaults_scheme_and_caller(tmp_path):
    f = tmp_path / "cat.yaml"
    f.write_text("version: 2\ndefaults: {autoquant: {calib_samples: 64}}\nschemes:\n"
                 "  a: {rule: {blocks_fraction: 0.5}, rationale: x}\n"
                 "  b: {rule: {blocks_fraction: 0.5}, rationale: x, autoquant: {method: kl_div}, fp8_format: fp8_static}\n")
    cat, _ = load_catalog(f)
    a, b = cat.settings("a"), cat.settings("b")
    assert a.calib_samples == 64 and a.method == "gradient" and b.method == "kl_div"
    assert b.fp8_format.value == "fp8_static"
    assert a.key("m") != b.key("m") and cat.settings("a", seed=3).key("m") != a.key("m")
    assert cat.settings("a").key("m") == cat.settings("a").key("m")


def test_plan_needs_the_model_facts_of_the_scores_file(skeleton):
    catalog, _ = load_catalog()
    sens = _sens(skeleton, [1.0] * 8)
    del sens["model_layout"]
    with pytest.raises(FP8MixError, match="rerun fp8mix score"):
        plan_scheme("fp8_autoquant_full", catalog, sens)


def test_planning_prints_nothing(skeleton, capfd):
    """The budget solver is silent: HiGHS's log would land in the run's output."""
    rng = random.Random(2)
    n = 144  # the 3B's 36 blocks x 4 groups
    solve_budget([rng.random() ** 6 for _ in range(n)], [rng.randint(1000, 100000) for _ in range(n)], 11.0)
    catalog, _ = load_catalog()
    sens = _sens(skeleton, [1.0 + b for b in range(skeleton[2].n_blocks)])
    for name in catalog.schemes:
        plan_scheme(name, catalog, sens)
    out, _ = capfd.readouterr()
    assert out == ""


@pytest.mark.parametrize("params", [(49_999_999, 50_000_001), (4_999_999, 5_000_001)])
def test_budget_is_never_exceeded_by_a_parameter_or_a_solver_tolerance(params):
    """An item a few parameters short of the budget alone does not meet it: the plan's effective bits, computed as
    the planner does, stay at or below the target."""
    got = solve_budget([0.0, 1.0], list(params), 12.0)
    fp8 = sum(p for p, on in zip(params, got) if on)
    assert 16.0 - 8.0 * fp8 / sum(params) <= 12.0


def test_solver_is_exact_for_scores_spanning_many_orders_of_magnitude():
    """Gradient scores of one model span orders of magnitude; the least sensitive groups, the ones a budget
    chooses among, must still be told apart by their scores (four group sizes, as the four kinds of a block)."""
    rng = random.Random(0)
    for _ in range(40):
        n = 12
        scores = [rng.random() * 10 ** rng.uniform(-12, 0) for _ in range(n)]
        params = [rng.choice([3, 5, 11, 13]) * 1000 for _ in range(n)]
        bits = rng.uniform(8, 15)
        need = (16 - bits) / 8 * sum(params)
        best = min(sum(s for s, on in zip(scores, pick) if on)
                   for pick in itertools.product([0, 1], repeat=n)
                   if sum(p for p, on in zip(params, pick) if on) >= need)
        got = solve_budget(scores, params, bits)
        assert sum(p for p, on in zip(params, got) if on) >= need
        assert sum(s for s, on in zip(scores, got) if on) == pytest.approx(best, rel=1e-9, abs=0)


def test_solver_breaks_ties_by_item_index():
    assert solve_budget([0.0] * 6, [10] * 6, 12.0) == [True] * 3 + [False] * 3
    assert solve_budget([2.0, 1.0, 1.0, 1.0, 2.0], [10] * 5, 12.8) == [False, True, True, False, False]
