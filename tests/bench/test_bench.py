"""fp8mix bench: one clear line without a GPU; the statistics of bench.json; the runner serving a real checkpoint
with an FP8 KV cache in vLLM's CPU build (one engine start, tiny workloads, eager mode: the CPU has no CUDA graphs)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fp8mix.bench.stage import add_speedups, bench_models, row_of, summarize
from fp8mix.check.live import vllm_python
from fp8mix.rundir import read_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runs import fp8mix, one_line_error  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: bench would run")
def test_bench_without_a_gpu_is_one_clear_line(tmp_path):
    line = one_line_error(fp8mix("bench", "--run", str(tmp_path)))
    assert "CUDA GPU" in line and "no CUDA device is visible" in line


def _runs(seconds, prompt=1000, output=100):
    return [{"seconds": s, "requests": 4, "prompt_tokens": prompt, "output_tokens": output} for s in seconds]


def test_summary_median_spread_and_speedup():
    s = summarize(_runs([2.0, 1.0, 4.0]), "total_tok_s")
    assert s["values"] == [550.0, 1100.0, 275.0]
    assert s["median"] == 550.0 and s["min"] == 275.0 and s["max"] == 1100.0
    assert s["spread"] == pytest.approx((1100 - 275) / 550)
    assert summarize(_runs([2.0, 1.0, 4.0]), "output_tok_s")["median"] == 50.0
    work = {"mixed": {"metric": "total_tok_s"}}
    rows = [row_of("fp8", Path("f"), {"ok": True, "workloads": {"mixed": _runs([1.0, 1.0, 1.0])}}, work,
                   log="INFO GPU KV cache size: 1,234,560 tokens"),
            row_of("bf16", Path("b"), {"ok": True, "workloads": {"mixed": _runs([2.0, 2.0, 2.0])}}, work)]
    add_speedups(rows)
    assert rows[0]["speedup_vs_bf16"] == {"mixed": 2.0} and rows[1]["speedup_vs_bf16"] == {"mixed": 1.0}
    assert rows[0]["kv_cache_tokens"] == 1234560 and rows[1]["kv_cache_tokens"] is None


def test_fewer_than_three_repeats_is_refused(tmp_path):
    from fp8mix.errors import FP8MixError

    with pytest.raises(FP8MixError, match="at least 3 repeats"):
        bench_models({}, tmp_path / "bench.json", py=sys.executable, repeats=2)


@pytest.mark.vllm
@pytest.mark.skipif(vllm_python() is None, reason="vLLM not importable and .venv-vllm missing")
def test_runner_serves_an_fp8_kv_checkpoint_in_vllm(embedded, tmp_path, monkeypatch):
    from fp8mix.export import export_checkpoint
    from fp8mix.score.batches import calibration_batches
    from fp8mix.score.settings import AutoQuantSettings
    from uniform_plans import uniform_plan

    batches, _, _ = calibration_batches(embedded.processor, AutoQuantSettings(calib_samples=2, batch_size=2))
    ckpt = export_checkpoint(embedded, uniform_plan(None, "fp8_autoquant_full_kv"), tmp_path / "kv", batches)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    workloads = {"images": {"n": 2, "in_tokens": 16, "images": 1.0, "image_px": 56, "max_tokens": 1,
                            "metric": "prompt_tok_s"},
                 "decode": {"n": 2, "in_tokens": 16, "images": 0.0, "max_tokens": 6, "metric": "output_tok_s"},
                 "long": {"n": 2, "in_tokens": 16, "images": 0.0, "max_tokens": 6, "decode_only": True,
                          "metric": "output_tok_s"}}
    cpu = {"enforce_eager": True, "max_model_len": 512, "max_num_seqs": 4, "dtype": "bfloat16", "seed": 0,
           "enable_prefix_caching": False,
           "limit_mm_per_prompt": {"image": 1, "video": 0}}
    out = tmp_path / "run" / "bench.json"
    import fp8mix.bench.stage as stage

    monkeypatch.setattr(stage, "ENGINE", cpu)   # vLLM's CPU build: no CUDA graphs, no GPU memory fraction
    monkeypatch.setattr(stage, "WARMUP", {"n": 1, "in_tokens": 8, "max_tokens": 2, "images": 0.0})
    doc = bench_models({"kv": {"path": ckpt, "kv_cache": "fp8"}}, out, py=vllm_python(), repeats=3,
                       workloads=workloads, timeout=600)
    row = doc["rows"][0]
    assert row["ok"], row["error"]
    assert row["kv_cache_dtype"] == "fp8"          # the checkpoint's kv_cache_scheme turned the cache to fp8
    assert row["kv_cache_tokens"] and row["engine_start_s"] > 0
    dec, img = row["workloads"]["decode"], row["workloads"]["images"]
    assert len(dec["values"]) == 3 and dec["output_tokens"] == 2 * 6   # ignore_eos: every token generated
    assert dec["prompt_tokens"] == 2 * 16
    assert row["workloads"]["long"]["output_tokens"] == 2 * 5   # decode timed apart: the first token is the prefill's
    assert img["prompt_tokens"] > 2 * 16            # the image tokens count as prompt tokens
    assert read_json(out, "bench")["rows"][0]["workloads"]["decode"]["median"] == dec["median"]


def test_a_runner_past_its_timeout_ends_with_every_process_it_started(tmp_path):
    """vLLM serves from processes of its own (the engine core, its workers), which outlive a killed front end and
    keep the GPU: a timeout ends the runner's whole process group, so the next model starts on a clean GPU."""
    import os
    import time

    from fp8mix.bench.stage import serve_one

    pid_file = tmp_path / "child.pid"
    py = tmp_path / "fake_python"
    py.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {pid_file}\nsleep 300\n")
    py.chmod(0o755)
    result, _ = serve_one(str(py), "m", tmp_path / "m", {}, {}, 3, tmp_path / "work", timeout=2)
    assert result == {"ok": False, "error": "vLLM did not finish within 2 s"}
    child = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the runner's child process outlived the timeout")


def test_each_row_records_the_key_of_the_model_it_measured(tmp_path):
    """bench.json names what each row measured (check.live.folder_key), so a report can tell a stale row."""
    doc = bench_models({"bf16": {"path": tmp_path / "src", "key": "abc"}, "x": {"path": tmp_path / "x"}},
                       tmp_path / "bench.json", py=sys.executable, time_budget=-1)
    assert [r["model_key"] for r in read_json(tmp_path / "bench.json", "bench")["rows"]] == ["abc", None]
    assert [r["model_key"] for r in doc["rows"]] == ["abc", None]


@pytest.mark.parametrize("engine, images, why", [({"enable_prefix_caching": True}, 0.0, "prefix cache"),
                                                 ({}, 0.25, "image cache")])
def test_a_decode_timed_apart_refuses_a_cached_second_prefill(tmp_path, engine, images, why):
    """The decode of a decode_only workload is the full call less the prefill-only call of the same requests; a
    cache that serves the second prefill would make it too fast, so such a setting stops before any model runs."""
    from fp8mix.errors import FP8MixError

    work = {"long": {"n": 2, "in_tokens": 16, "max_tokens": 8, "images": images, "decode_only": True,
                     "metric": "output_tok_s"}}
    with pytest.raises(FP8MixError, match=why):
        bench_models({"bf16": {"path": tmp_path / "m", "engine": engine}}, tmp_path / "bench.json",
                     py=sys.executable, workloads=work)
    assert not (tmp_path / "bench.json").exists()
