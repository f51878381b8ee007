"""Data-parallel scoring: 2 processes under torchrun (gloo, CPU) give the single-process scores and plans."""

import json
import os
import subprocess
import sys

import pytest

CATALOG = """
version: 1
defaults:
  autoquant: {calib_samples: 6, batch_size: 2}
schemes:
  dyn_half:
    rule: {blocks_fraction: 0.5}
    rationale: half the blocks
  static_bits:
    fp8_format: fp8_static
    rule: {effective_bits: 12.0, granularity: group}
    rationale: static budget
  kl_quarter:
    autoquant: {method: kl_div, calib_samples: 3, batch_size: 1}
    rule: {blocks_fraction: 0.25}
    rationale: KL method
"""


def _run(cmd, **env):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same catalog scored by one process and by two (one thread each: CPU matmuls then give bitwise equal
    per-batch terms, so only the order of the float64 sums differs)."""
    tmp = tmp_path_factory.mktemp("dp")
    cat = tmp / "catalog.yaml"
    cat.write_text(CATALOG)
    single, multi = tmp / "single", tmp / "multi"
    fp8mix = [sys.executable, "-m", "fp8mix"]
    _run([*fp8mix, "score", "--out", str(single), "--catalog", str(cat), "--threads", "1"])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "-m", "fp8mix", "score", "--out", str(multi), "--catalog", str(cat)], OMP_NUM_THREADS="1")
    for run in (single, multi):
        _run([*fp8mix, "plan", "--run", str(run)])
    return single, multi


def _scores(run):
    return {f.name: json.loads(f.read_text()) for f in sorted((run / "scores").glob("*.json"))}


def test_two_processes_give_the_single_process_scores(runs):
    single, multi = (_scores(r) for r in runs)
    assert len(single) == 3 and single.keys() == multi.keys()  # 3 distinct settings, same cache keys
    for key, a in single.items():
        b = multi[key]
        assert a["calibration"]["n_tokens"] == b["calibration"]["n_tokens"] > 0
        assert [g["name"] for g in a["groups"]] == [g["name"] for g in b["groups"]]
        for ga, gb in zip(a["groups"], b["groups"]):
            assert ga["score"] > 0
            assert gb["score"] == pytest.approx(ga["score"], rel=1e-12, abs=0), (key, ga["name"])
        assert [x["rank"] for x in a["blocks"]] == [x["rank"] for x in b["blocks"]]


def test_two_processes_give_the_same_plans(runs):
    single, multi = runs
    names = sorted(p.name for p in (single / "plans").glob("*.json"))
    assert names == ["dyn_half.json", "kl_quarter.json", "static_bits.json"]
    for name in names:
        a, b = (json.loads((r / "plans" / name).read_text()) for r in runs)
        assert a["fp8_modules"] == b["fp8_modules"] and a["ignore"] == b["ignore"]


def test_run_json_records_the_processes(runs):
    single, multi = runs
    assert json.loads((multi / "run.json").read_text())["processes"]["score"] == 2
    assert json.loads((single / "run.json").read_text())["processes"]["score"] == 1


def test_gpus_without_gpus_is_one_clear_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA GPUs")
    r = subprocess.run([sys.executable, "-m", "fp8mix", "score", "--out", str(tmp_path / "r"), "--gpus", "2"],
                       capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "needs 2 CUDA GPU" in lines[0] and "torchrun" in lines[0]


def test_other_commands_refuse_torchrun(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fp8mix", "plan", "--run", str(tmp_path)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "WORLD_SIZE": "2"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "only `fp8mix score` runs under torchrun" in lines[0]


def test_a_failure_under_torchrun_ends_every_process(tmp_path):
    """Bad input under torchrun: each process says why in one line and the launch ends (no rank left waiting)."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "fp8mix", "score", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "nope.jsonl")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors and all("nope.jsonl" in ln for ln in errors)
