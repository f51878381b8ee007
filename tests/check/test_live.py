"""Live vLLM check of every scheme of the embedded model, on vLLM's CPU build (.venv-vllm, built by make).

Engine starts: the BF16 source and every scheme once each, all in one process (the `live_checked` fixture, shared
with the served parity and served eval tests); in a second process the broken vision regex, a folder vLLM cannot
start and the full scheme again (the `one_process` fixture); the full scheme once more in a process of its own.
The checkpoint with a doubled weight scale is in test_served_eval.py (one engine for the live check and the served
eval).
"""

import pytest

from .check_helpers import broken_copy, plan_of, with_doubled_weight_scale
from fp8mix.check import fidelity
from fp8mix.check.live import Runner, engine_settings, serve, served_outputs, vllm_python
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


@pytest.fixture(scope="module")
def one_process(check_run, live_checked, eval_samples, tmp_path_factory):
    """One `Runner` serving in turn: the top25 checkpoint with the vision regex in one naming only (vLLM loads it,
    with load warnings), a copy whose weights file is cut short (vLLM cannot start it), the full scheme on the live
    check's requests, a job past its timeout, then the cut copy again."""
    tmp = tmp_path_factory.mktemp("one_process")
    top25 = check_run.run / "checkpoints" / "fp8_autoquant_top25"
    regex = broken_copy(top25, tmp / "regex",
                        ignore_edit=lambda ign: [e if e != "re:.*visual.*" else r"re:model\.visual\..*" for e in ign])
    cut = broken_copy(top25, tmp / "cut")
    weights = next(cut.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    out = {"requests": full_scheme_requests(check_run, eval_samples)}
    with Runner() as runner:
        out["regex"] = runner.serve(regex)
        out["cut"] = runner.serve(cut)
        out["full"] = runner.serve(check_run.run / "checkpoints" / "fp8_autoquant_full", out["requests"],
                                   engine=engine_settings(1024))
        out["processes_before_timeout"] = runner.processes
        out["late"] = runner.serve(cut, timeout=0.01)
        out["cut_again"] = runner.serve(cut)
        out["processes"] = runner.processes
    return out


def full_scheme_requests(check_run, eval_samples):
    """The requests the live check served the full scheme with: the probes on BF16's replies, the evaluation set."""
    reference = read_json(check_run.run / fidelity.REFERENCE_FILE, "served")
    return fidelity.probe_requests(reference["outputs"]).extend(eval_requests(eval_samples))


def test_vision_regex_in_one_naming_breaks_vllm_too(one_process):
    """The broken variant fails in vLLM itself, not only in the static check: proof the rule is real."""
    live = one_process["regex"]
    assert live["ran"] and live["ok"] is False
    assert any("Attempted to load weight" in e for e in live["errors"]), live["errors"][:3]


def _greedy(outputs: dict) -> dict:
    return {rid: (o["prompt_token_ids"], o["token_ids"], (o.get("continuation") or {}).get("token_ids"))
            for rid, o in outputs.items()}


def test_one_process_serves_several_models_like_one_process_each(check_run, live_checked, one_process, eval_samples):
    """Several models served by one process (vLLM imported once, each engine shut down before the next starts) give
    the greedy token ids one process per model gives: the full scheme served alone equals it served after six other
    engines (the live check's process) and after a broken regex and a folder vLLM cannot start (`one_process`). The
    folder that cannot start is reported for itself, and the same process serves the next model; a job past its
    timeout is recorded for itself, and the next model gets a fresh process."""
    alone = serve(check_run.run / "checkpoints" / "fp8_autoquant_full", one_process["requests"],
                  engine=engine_settings(1024))
    assert alone["ok"], alone["errors"]
    after_six = served_outputs(check_run.run, "fp8_autoquant_full")
    after_broken = one_process["full"]
    assert after_broken["ok"], after_broken["errors"]
    assert len(alone["outputs"]) == len(one_process["requests"].requests) == len(after_six)
    assert _greedy(after_broken["outputs"]) == _greedy(alone["outputs"]) == _greedy(after_six)
    cut = one_process["cut"]
    assert cut["ran"] and cut["ok"] is False and not cut["outputs"]
    assert any("Error" in e for e in cut["errors"]), cut["errors"]
    assert one_process["processes_before_timeout"] == 1
    assert one_process["late"]["ok"] is False
    assert one_process["late"]["errors"] == ["vLLM did not finish within 0.01 s"]
    assert one_process["cut_again"]["ok"] is False and one_process["cut_again"]["errors"] == cut["errors"]
    assert one_process["processes"] == 2
    timings = after_broken["timings_s"]
    print(f"\nthe full scheme alone: {alone['timings_s']}\nthe same, third in one process: {timings}")
    assert timings["import"] == 0 and timings["load"] == timings["engine_start"]


def test_a_process_that_ended_between_models_is_replaced():
    """The runner's process ended while no model was in progress (killed, out of memory): the next model is served
    by a fresh process, not failed for an exit that was not its own."""
    import os
    import signal

    from fp8mix.models.loading import EMBEDDED

    with Runner() as runner:
        assert runner.start()
        os.kill(runner._proc.pid, signal.SIGKILL)
        runner._proc.wait()
        res = runner.serve(EMBEDDED)
        assert res["ran"] and res["ok"], res["errors"]
        assert runner.processes == 2
