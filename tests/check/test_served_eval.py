"""The served eval: every scheme's quality as vLLM's CPU build serves it, read off the live check's engines.

`fp8mix eval --engine vllm` on the checked run starts no engine (the check's engines served the evaluation set);
BF16 as served against itself is exact; each served scheme stays within the noise between the engines of its
emulation (reply top-1 agreement and reply top-k KL, the report's departure rule); and a checkpoint with one
layer's weight scales doubled departs.
"""

from __future__ import annotations

import pytest
import torch

from .check_helpers import N_EVAL, plan_of, with_doubled_weight_scale
from fp8mix.check import live as live_mod
from fp8mix.check.fidelity import REFERENCE_FILE
from fp8mix.check.live import read_served, vllm_python
from fp8mix.check.stage import check_folder
from fp8mix.evaluate.checkpoint import scheme_applied
from fp8mix.evaluate.metrics import Tally, outputs, placeholder_ids
from fp8mix.evaluate.served import eval_requests, served_tally
from fp8mix.report.served import departures
from fp8mix.rundir import read_json
from fp8mix.score.batches import make_batches

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(vllm_python() is None, reason="vLLM not importable and .venv-vllm missing: "
                                                                 "make vllm-env builds it")]

# Block 0's MLP output feeds every later block: doubling its weight scales moves the served outputs by several
# times the FP8 noise (measured in fidelity.TOLERANCES' comment).
DOUBLED = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def served_eval(check_run, live_checked):
    from fp8mix.evaluate.stage import stage_eval

    def no_engine(*args, **kwargs):
        raise AssertionError("the served eval started an engine: the check's engines served the evaluation set")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live_mod.Runner, "serve", no_engine)
        return stage_eval(check_run, N_EVAL, "vllm")


def _emulated(embedded, samples, folder=None) -> dict:
    """Reply top-1 agreement and reply top-k KL of a checkpoint as fp8mix emulates it (no generation)."""
    model, proc = embedded.model, embedded.processor
    placeholders = placeholder_ids(model.config)
    batches = make_batches(proc, samples, 8, 1024)
    refs = [outputs(model, b, placeholders) for b in batches]
    tally = Tally()
    with scheme_applied(model, folder, embedded.adapter):
        for b, ref in zip(batches, refs):
            tally.add(ref, outputs(model, b, placeholders))
    reply = torch.cat(tally.reply).bool()
    return {"top1_reply_agreement": float(torch.cat(tally.agree)[reply].float().mean()),
            "kl_topk_reply_mean": float(torch.cat(tally.kl_topk)[reply].mean())}


def test_served_rows_of_every_scheme(check_run, served_eval):
    rows = {r["scheme"]: r for r in served_eval["rows"]}
    assert all(r["engine"] == "vllm" for r in rows.values()) and served_eval["engines"]["transformers"]["ran"] is False
    bf16 = rows["bf16"]
    assert bf16["served"] and bf16["kl_topk_mean"] == 0 and bf16["top1_agreement"] == 1 and bf16["flips_vs_bf16"] == 0
    assert bf16["n_samples"] == N_EVAL and bf16["n_reply_positions"] > 300 and bf16["tokens_per_s"] > 0
    for name, r in rows.items():
        assert r["served"], (name, r.get("reason"), r.get("error"))
        assert 0 <= r["kl_topk_reply_mean"] < 0.05 and r["top1_reply_agreement"] > 0.9, (name, r)
        assert r["n_reply_positions"] == bf16["n_reply_positions"], name
    assert rows["fp8_autoquant_full"]["kl_topk_reply_mean"] > rows["fp8_autoquant_top25"]["kl_topk_reply_mean"] > 0


def test_served_full_scheme_is_its_emulation(embedded, check_run, served_eval, eval_samples):
    """The most aggressive scheme as served stays within the engines' noise of its emulation."""
    name = "fp8_autoquant_full"
    served = next(r for r in served_eval["rows"] if r["scheme"] == name)
    emulated = _emulated(embedded, eval_samples, check_run.run / "checkpoints" / name)
    print(f"\n{name}: reply top-1 emulated {emulated['top1_reply_agreement']:.4f} served "
          f"{served['top1_reply_agreement']:.4f}; reply top-k KL emulated {emulated['kl_topk_reply_mean']:.4g} "
          f"served {served['kl_topk_reply_mean']:.4g}")
    assert not departures(emulated, served), departures(emulated, served)


def test_doubled_weight_scale_fails_the_live_check_and_departs(embedded, check_run, live_checked, served_eval,
                                                                skeleton, eval_samples, tmp_path):
    """One FP8 layer's weight scales doubled: it loads, its dtypes are right, it generates; only its outputs give
    it away. The live check must fail it, and its served quality must depart from what the emulation of the intact
    checkpoint predicts (one engine start for both: the probes and the evaluation set)."""
    net, adapter, layout = skeleton
    name = "fp8_autoquant_full"
    assert live_checked[name]["live"]["ok"]
    plan = plan_of(check_run.run, name)
    assert adapter.to_memory(DOUBLED + ".weight").rsplit(".", 1)[0] in plan["fp8_modules"]
    bad = with_doubled_weight_scale(check_run.run / "checkpoints" / name, tmp_path / "doubled", DOUBLED)
    reference = read_json(check_run.run / REFERENCE_FILE, "served")
    res, served = check_folder(bad, plan, net, adapter, layout, True, False, lambda: reference,
                               eval_requests(eval_samples), live_mod.engine_settings(1024))
    live = res["live"]
    assert res["static"]["ok"] and live["ran"] and served["outputs"]
    assert not res["ok"] and live["ok"] is False
    assert not any("weight load warning" in e for e in live["errors"])
    out_errors = [e for e in live["errors"] if e.startswith("outputs: ")]
    assert out_errors and all("BF16 source" in e for e in out_errors), live["errors"]
    placeholders = placeholder_ids(embedded.model.config)
    bf16 = read_served(check_run.run, "bf16")["outputs"]
    doubled = served_tally(served["outputs"], bf16, eval_samples, embedded.processor, placeholders, "doubled")
    row = doubled.row(eval_samples, [bf16[f"eval/{i}/reply"]["text"].strip() for i in range(len(eval_samples))])
    emulated = _emulated(embedded, eval_samples, check_run.run / "checkpoints" / name)
    why = departures(emulated, row)
    print(f"\ndoubled {DOUBLED}: served reply top-1 {row['top1_reply_agreement']:.4f}, reply top-k KL "
          f"{row['kl_topk_reply_mean']:.4g}; departs: {why}")
    assert why


def test_a_format_vllm_cannot_run_here_gets_a_row_that_says_so(check_run, live_checked, tmp_path):
    """On a CPU, a scheme whose format vLLM's CPU build has no kernels for is not served (no engine start) and its
    vLLM row says why; the other schemes are served as before."""
    import json
    import shutil

    from fp8mix.evaluate.stage import stage_eval

    run = shutil.copytree(check_run.run, tmp_path / "run")
    plan_file = run / "plans" / "fp8_autoquant_top25.json"
    plan = json.loads(plan_file.read_text())
    plan_file.write_text(json.dumps({**plan, "fp8_format": "fp8_static"}))

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was started")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live_mod.Runner, "serve", no_engine)
        doc = stage_eval(type(check_run)(**{**check_run.__dict__, "run": run}), N_EVAL, "vllm")
    rows = {r["scheme"]: r for r in doc["rows"]}
    assert rows["fp8_autoquant_top25"]["served"] is False
    assert rows["fp8_autoquant_top25"]["reason"] == "not served here: vLLM's CPU build has no kernels for fp8_static"
    assert all(r["served"] for n, r in rows.items() if n != "fp8_autoquant_top25")


def test_served_outputs_of_another_checkpoint_are_not_reused(check_run, live_checked, tmp_path):
    """A checkpoint exported again after the check (another export key) is served again, never evaluated from the
    outputs its predecessor gave."""
    import json
    import shutil

    from fp8mix.check.live import folder_key
    from fp8mix.evaluate.stage import stage_eval

    name = "fp8_autoquant_full"
    assert read_served(check_run.run, name)["model_key"] == folder_key(check_run.run / "checkpoints" / name)
    run = shutil.copytree(check_run.run, tmp_path / "run")
    marker = run / "checkpoints" / name / "fp8mix_plan.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "export_key": "another export"}))

    def engine(runner, folder, *args, **kwargs):
        raise AssertionError(f"an engine was started for {folder.name}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live_mod.Runner, "serve", engine)
        with pytest.raises(AssertionError, match=f"an engine was started for {name}"):
            stage_eval(type(check_run)(**{**check_run.__dict__, "run": run}), N_EVAL, "vllm")


def test_outputs_served_by_another_vllm_are_served_again(check_run, live_checked, tmp_path):
    """The check's served outputs are reused only when they came from this vLLM and this runner: a document that
    records another vLLM version (or no runner digest, as older runs wrote) is served again, the rest are not."""
    import json
    import shutil

    from fp8mix.check.live import SERVED_DIR
    from fp8mix.evaluate.stage import stage_eval

    run = shutil.copytree(check_run.run, tmp_path / "run")
    stale = run / SERVED_DIR / "fp8_autoquant_top25.json"
    doc = json.loads(stale.read_text())
    stale.write_text(json.dumps({**doc, "vllm_version": "0.0.1"}))
    old = run / SERVED_DIR / "fp8_autoquant_top50.json"
    doc = json.loads(old.read_text())
    doc.pop("runner")
    old.write_text(json.dumps(doc))
    served = []

    def record(self, folder, *args, **kwargs):
        served.append(folder.name)
        return {"ok": False, "errors": ["not served in this test"]}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live_mod.Runner, "serve", record)
        doc = stage_eval(type(check_run)(**{**check_run.__dict__, "run": run}), N_EVAL, "vllm")
    assert sorted(served) == ["fp8_autoquant_top25", "fp8_autoquant_top50"]
    rows = {r["scheme"]: r for r in doc["rows"]}
    assert not rows["fp8_autoquant_top25"]["served"] and rows["fp8_autoquant_full"]["served"]
