"""Live vLLM check of every scheme of the embedded model, on vLLM's CPU build (.venv-vllm, built by make)."""

import pytest

from .check_helpers import broken_copy, plan_of
from fp8mix.check.live import vllm_python
from fp8mix.check.stage import check_folder, stage_check

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(vllm_python() is None, reason="vLLM not importable and .venv-vllm missing: "
                                                                 "make vllm-env builds it")]


def test_every_scheme_loads_and_runs_in_vllm(check_run):
    results = stage_check(check_run, live=True)
    for name, r in results.items():
        live = r["live"]
        assert r["ok"] and live["ran"] and live["ok"], (name, live.get("errors"), live.get("reason"))
        assert live["generations"]["image"]["n_image_tokens"] > 0
        plan = plan_of(check_run.run, name)
        fp8_layers = {n for n, info in live["layers"].items() if info["weight_dtype"] == "float8_e4m3fn"}
        # vLLM fuses q/k/v and gate/up: each FP8 group is one FP8 layer there
        assert len(fp8_layers) == len(plan["fp8_groups"]), name
        assert not any("visual" in n for n in fp8_layers)


def test_vision_regex_in_one_naming_breaks_vllm_too(check_run, skeleton, tmp_path):
    """The broken variant fails in vLLM itself, not only in the static check: proof the rule is real."""
    from fp8mix.check.live import run_live

    bad = broken_copy(check_run.run / "checkpoints" / "fp8_autoquant_top25", tmp_path / "bad",
                      ignore_edit=lambda ign: [e if e != "re:.*visual.*" else r"re:model\.visual\..*" for e in ign])
    live = run_live(bad, [], [])
    assert live["ran"] and live["ok"] is False
    assert any("Attempted to load weight" in e for e in live["errors"]), live["errors"][:3]
