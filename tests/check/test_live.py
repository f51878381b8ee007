"""Live vLLM check of every scheme of the embedded model, on vLLM's CPU build (.venv-vllm, built by make).

Engine starts: the BF16 source and every scheme once each (the `live_checked` fixture, shared with the served
parity and served eval tests), one for the broken vision regex. The checkpoint with a doubled weight scale is in
test_served_eval.py (one engine for the live check and the served eval).
"""

import pytest

from .check_helpers import broken_copy, plan_of, with_doubled_weight_scale
from fp8mix.check import fidelity
from fp8mix.check.live import engine_settings, serve, served_outputs, vllm_python
from fp8mix.check.stage import check_folder
from fp8mix.evaluate.served import eval_requests
from fp8mix.rundir import read_json

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(vllm_python() is None, reason="vLLM not importable and .venv-vllm missing: "
                                                                 "make vllm-env builds it")]

def test_every_scheme_loads_runs_and_matches_bf16_in_vllm(check_run, live_checked):
    for name, r in live_checked.items():
        live = r["live"]
        assert r["ok"] and live["ran"] and live["ok"], (name, live.get("errors"), live.get("reason"))
        plan = plan_of(check_run.run, name)
        fp8_layers = {n for n, info in live["layers"].items() if info["weight_dtype"] == "float8_e4m3fn"}
        # vLLM fuses q/k/v and gate/up: each FP8 group is one FP8 layer there
        assert len(fp8_layers) == len(plan["fp8_groups"]), name
        assert not any("visual" in n for n in fp8_layers)
        m = live["fidelity"]["metrics"]
        assert m["probes"] == len(fidelity.probe_samples()) and m["positions"] >= 50, (name, m)
        assert m["top1_agreement"] >= fidelity.TOLERANCES["top1_agreement_min"], (name, m)
        assert m["mean_logprob_gap"] <= fidelity.TOLERANCES["mean_logprob_gap_max"], (name, m)
    probes = served_outputs(check_run.run, "fp8_autoquant_full")
    assert all(probes[f"probe/{i}"]["n_image_tokens"] > 0 for i in range(8))  # the shapes probes carry an image


def test_bf16_reference_is_served_once_and_reused(check_run, live_checked, eval_samples, monkeypatch):
    """The BF16 source's outputs are cached in the run, keyed by its fingerprint and the requests: a second check
    with the same requests starts no engine for it; other requests do not reuse it."""
    from fp8mix.models import loading

    doc = read_json(check_run.run / fidelity.REFERENCE_FILE, "served")
    assert doc["ok"] and doc["key"]["source_fingerprint"] == loading.fingerprint(loading.EMBEDDED)

    def no_engine(*args, **kwargs):
        raise AssertionError("vLLM was started again for the BF16 source")

    monkeypatch.setattr(fidelity, "serve", no_engine)
    engine = engine_settings(1024)
    served = eval_requests(eval_samples)  # as live_checked served them
    cached = fidelity.bf16_reference(check_run.run, loading.EMBEDDED, loading.fingerprint(loading.EMBEDDED), engine,
                                     served)
    assert cached == doc and doc["extra_key"] == served.key()
    with pytest.raises(AssertionError, match="started again"):
        fidelity.bf16_reference(check_run.run, loading.EMBEDDED, loading.fingerprint(loading.EMBEDDED), engine, None)
    with pytest.raises(AssertionError, match="started again"):  # another context length: another engine
        fidelity.bf16_reference(check_run.run, loading.EMBEDDED, loading.fingerprint(loading.EMBEDDED),
                                engine_settings(2048), served)


def test_vision_regex_in_one_naming_breaks_vllm_too(check_run, tmp_path):
    """The broken variant fails in vLLM itself, not only in the static check: proof the rule is real."""
    bad = broken_copy(check_run.run / "checkpoints" / "fp8_autoquant_top25", tmp_path / "bad",
                      ignore_edit=lambda ign: [e if e != "re:.*visual.*" else r"re:model\.visual\..*" for e in ign])
    live = serve(bad)
    assert live["ran"] and live["ok"] is False
    assert any("Attempted to load weight" in e for e in live["errors"]), live["errors"][:3]
