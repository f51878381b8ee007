"""Served parity of the FP8 KV cache: fp8mix's emulation (`scheme_applied`: FP8 weights and keys/values quantized
with the checkpoint's k/v scales) against vLLM's CPU build serving the exported checkpoint with its fp8_e4m3 cache
(the `live_checked` engines: no engine start of its own). Where vLLM's CPU build cannot run an fp8 KV cache (no
AVX-512/AMX) the live check says why and this test is skipped."""

from __future__ import annotations

import pytest

from fp8mix.check.live import served_outputs, vllm_python
from fp8mix.evaluate.accuracy import greedy_replies
from fp8mix.evaluate.checkpoint import scheme_applied

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(vllm_python() is None, reason="vLLM not importable and .venv-vllm missing")]

ANSWERS_EQUAL_KV = 0.90
NAME = "fp8_autoquant_full_kv"


def test_fp8_kv_cache_emulated_vs_served(embedded, check_run, live_checked, parity_samples):
    live = live_checked[NAME]["live"]
    if not live["ran"]:
        assert live["reason"].startswith("not served here:"), live["reason"]
        pytest.skip(live["reason"])
    assert live["ok"], live["errors"]
    served = served_outputs(check_run.run, NAME)
    n = len(parity_samples)
    samples = [s for _, s in parity_samples]
    theirs = [served[f"eval/{i}/reply"]["text"].strip() for i, _ in parity_samples]
    with scheme_applied(embedded.model, check_run.run / "checkpoints" / NAME, embedded.adapter):
        mine = greedy_replies(embedded.model, embedded.processor, samples)
    with scheme_applied(embedded.model, check_run.run / "checkpoints" / "fp8_autoquant_full", embedded.adapter):
        no_kv = greedy_replies(embedded.model, embedded.processor, samples)
    equal = sum(a == b for a, b in zip(mine, theirs))
    equal_no_kv = sum(a == b for a, b in zip(no_kv, theirs))
    print(f"\nFP8 KV cache, emulated vs served: equal answers {equal}/{n}; emulation without the KV cache vs "
          f"served: {equal_no_kv}/{n}")
    assert equal / n >= ANSWERS_EQUAL_KV, [f"{a!r} vs {b!r}" for a, b in zip(mine, theirs) if a != b][:3]
    assert equal >= equal_no_kv   # quantizing the cache brings the emulation closer to vLLM, never further


def test_vllm_runs_the_stored_kv_scales_and_a_kv_cache_it_ignores_fails(check_run, live_checked, skeleton,
                                                                          tmp_path):
    """The live check reads the KV cache dtype and k/v scales vLLM's attention layers run with. The checkpoint as
    exported: fp8 at exactly the stored scales. The same checkpoint without its kv_cache_scheme: vLLM skips the
    stored scales with a log line and runs a BF16 cache, and the live check fails it (the static check would
    too; here the live check is called alone)."""
    import json
    import shutil

    from .check_helpers import plan_of
    from fp8mix.check.fidelity import REFERENCE_FILE
    from fp8mix.check.stage import live_check
    from fp8mix.rundir import read_json

    net, adapter, layout = skeleton
    good = live_checked[NAME]["live"]
    if good["ran"]:
        lm = {n: a for n, a in good["attention"].items() if n.startswith("language_model.")}
        assert lm and all(a["kv_cache_dtype"].startswith("fp8") and a["k_scale"] != 1.0 for a in lm.values()), lm
    full = live_checked["fp8_autoquant_full"]["live"]
    assert full["ran"] and not any(a["kv_cache_dtype"].startswith("fp8") for a in full["attention"].values())
    bad = shutil.copytree(check_run.run / "checkpoints" / NAME, tmp_path / "no_kv_scheme")
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]["kv_cache_scheme"]
    (bad / "config.json").write_text(json.dumps(cfg))
    reference = read_json(check_run.run / REFERENCE_FILE, "served")
    live, _ = live_check(bad, plan_of(check_run.run, NAME), adapter, layout, reference)
    assert live["ran"] and live["ok"] is False
    assert any("KV cache; the plan asks for fp8" in e for e in live["errors"]), live["errors"]


VLLM_CACHE_WRITE = """
import sys, torch, vllm._custom_ops as ops
x = torch.load(sys.argv[1])
t, h, d = x.shape
kv = torch.zeros(1, h, 2 * t, d, dtype=torch.uint8)            # one block of t slots: keys, then values
kc, vc = kv.chunk(2, dim=2)
ops.cpu_attn_reshape_and_cache(x, x, kc, vc, torch.arange(t), "vec", k_scale=float(sys.argv[3]),
                               v_scale=float(sys.argv[3]), kv_cache_dtype="fp8")
torch.save(vc.clone(), sys.argv[2])
"""


def test_kv_scale_means_what_vllms_cache_write_divides_by(tmp_path):
    """vLLM's own CPU cache write (cpu_attn_reshape_and_cache): e4m3 of x / v_scale, saturated at +-448 and, on
    the CPU build, rounded toward zero; fp8mix's quantize_kv (vLLM's CUDA write: nearest, ties to even) lands on
    the same value or the neighbour one e4m3 step further from zero."""
    import subprocess

    import torch

    from fp8mix.check.static import cpu_fp8_kv_cache_reason
    from fp8mix.quant.numerics import quantize_kv

    if (why := cpu_fp8_kv_cache_reason(64)):
        pytest.skip(why)
    x = (torch.randn(32, 2, 64, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    x[0, 0, :4] = torch.tensor([1000.0, -1000.0, 0.0, 1e-6])
    scale = 0.02
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([vllm_python(), "-c", VLLM_CACHE_WRITE, str(tmp_path / "x.pt"), str(tmp_path / "v.pt"),
                    str(scale)], check=True, capture_output=True, timeout=300)
    theirs = torch.load(tmp_path / "v.pt")[0].transpose(0, 1).contiguous().view(torch.float8_e4m3fn).float()  # t,h,d
    y = x.float() / torch.tensor(scale, dtype=torch.float32)
    codes = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()           # +0 .. 448
    toward_zero = torch.sign(y) * codes[torch.searchsorted(codes, y.abs().clamp(max=448), right=True) - 1]
    assert torch.equal(theirs, toward_zero)
    mine = quantize_kv(x, scale).float()
    step = codes[torch.searchsorted(codes, theirs.abs(), right=True).clamp(max=126)] - theirs.abs()
    assert torch.equal(torch.sign(mine) * torch.sign(theirs) >= 0, torch.ones_like(mine, dtype=torch.bool))
    assert bool(((mine.abs() == theirs.abs()) | (mine.abs() == theirs.abs() + step)).all())
    assert float(mine.abs().max()) == float(theirs.abs().max()) == 448.0
