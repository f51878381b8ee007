"""Eval's peak memory does not grow with the number of eval samples: the BF16 reference is held one chunk at a
time. The same measurement with a budget that holds the whole set shows the growth it would otherwise have."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")

SIZES = (16, 40)


def _measure(budget: int) -> dict:
    script = Path(__file__).with_name("eval_memory.py")
    # a fixed mmap threshold: glibc's adaptive one keeps freed large blocks in the heap, which reads as growth
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run([sys.executable, str(script), str(budget), *map(str, SIZES)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    small, large = (doc[n] for n in SIZES)
    growth = large["peak_above_base"] - small["peak_above_base"]
    extra = large["reference_bytes"] - small["reference_bytes"]
    print(f"\nbudget {budget}: peak {small['peak_above_base'] / 1e6:.1f} MB for {SIZES[0]} samples, "
          f"{large['peak_above_base'] / 1e6:.1f} MB for {SIZES[1]}; their reference logits differ by {extra / 1e6:.1f} MB")
    return {"growth": growth, "extra_reference": extra}


def test_peak_memory_does_not_grow_with_the_eval_set():
    bounded = _measure(1)  # every batch its own chunk
    assert bounded["growth"] < 0.2 * bounded["extra_reference"]
    held = _measure(1 << 40)  # the whole set in one chunk: the reference of every sample held at once
    assert held["growth"] > 0.6 * held["extra_reference"]
