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
