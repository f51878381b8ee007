#!/usr/bin/env python3
"""GPU: the LM linear layers of one decode step at the Qwen2.5-VL-3B shapes, BF16 against vLLM's FP8 path, with
launch overhead taken out (each step captured in a CUDA graph), for a range of batch sizes M.

What a served decode step spends in its linears, apart from everything else a step does (attention, norms, the
BF16 lm_head, sampling, the scheduler). 36 blocks x the four fused linears as vLLM runs them (qkv 2048→2560,
o 2048→2048, gate_up 2048→22016, down 11008→2048), each block with its own weights (5.5 GB in BF16, so nothing
stays in L2 between steps):

- ``bf16``: ``torch.nn.functional.linear``;
- ``fp8``: vLLM's compressed-tensors W8A8 path for per-channel FP8 weights and dynamic per-token activations:
  ``scaled_fp8_quant(x, use_per_token_if_dynamic=True)`` then ``cutlass_scaled_mm`` (the activation quantized
  before every linear, as when nothing fuses it);
- ``fp8_gemm``: the same GEMMs on activations already in FP8 (the quantization's own share);
- ``lm_head``: the BF16 lm_head (2048→151,936) that every scheme keeps.

Run on a CUDA machine where vLLM is importable::

    PYTHONPATH=/tmp/site:src python3 benchmarks/bench_fp8_linear.py [--out OUT/fp8_linear.json]
"""

from __future__ import annotations

import argparse
import json
import sys

SHAPES = {"qkv": (2048, 2560), "o": (2048, 2048), "gate_up": (2048, 22016), "down": (11008, 2048)}
BLOCKS = 36
VOCAB, HIDDEN = 151936, 2048
MS = (1, 8, 64, 256, 1024)


def graph_ms(fn, reps: int = 20) -> float:
    """Milliseconds per call of `fn` replayed from a CUDA graph (median of `reps` replays)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times = sorted(times[3:])
    return times[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("error: bench_fp8_linear needs a CUDA GPU", file=sys.stderr)
        return 2
    from vllm import _custom_ops as ops

    torch.manual_seed(0)
    dev = torch.device("cuda")
    w16 = [{k: torch.randn(n, kk, device=dev, dtype=torch.bfloat16) * 0.02 for k, (kk, n) in SHAPES.items()}
           for _ in range(BLOCKS)]
    w8, s8 = [], []
    for blk in w16:
        q, s = {}, {}
        for k, w in blk.items():
            scale = w.float().abs().amax(dim=1, keepdim=True) / 448.0       # per output channel
            q[k] = (w.float() / scale).to(torch.float8_e4m3fn).t()          # [K, N], column-major as CUTLASS wants
            s[k] = scale.contiguous()
        w8.append(q)
        s8.append(s)
    head = torch.randn(VOCAB, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02

    rows = []
    for m in MS:
        xs = {k: torch.randn(m, kk, device=dev, dtype=torch.bfloat16) for k, (kk, _) in SHAPES.items()}
        qx = {k: ops.scaled_fp8_quant(x, use_per_token_if_dynamic=True) for k, x in xs.items()}

        def bf16():
            for blk in w16:
                for k, w in blk.items():
                    F.linear(xs[k], w)

        def fp8():
            for blk, sc in zip(w8, s8):
                for k, w in blk.items():
                    q, sa = ops.scaled_fp8_quant(xs[k], use_per_token_if_dynamic=True)
                    ops.cutlass_scaled_mm(q, w, scale_a=sa, scale_b=sc[k], out_dtype=torch.bfloat16)

        def fp8_gemm():
            for blk, sc in zip(w8, s8):
                for k, w in blk.items():
                    q, sa = qx[k]
                    ops.cutlass_scaled_mm(q, w, scale_a=sa, scale_b=sc[k], out_dtype=torch.bfloat16)

        def lm_head():
            F.linear(xs["qkv"], head)

        row = {"M": m, **{name: graph_ms(fn) for name, fn in
                          (("bf16", bf16), ("fp8", fp8), ("fp8_gemm", fp8_gemm), ("lm_head", lm_head))}}
        row["fp8_speedup"] = row["bf16"] / row["fp8"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    gb16 = sum(w.numel() * 2 for blk in w16 for w in blk.values()) / 1e9
    gb8 = sum(w.numel() for blk in w8 for w in blk.values()) / 1e9
    print(f"\nLM linears of one decode step, {BLOCKS} blocks, CUDA graph, {torch.cuda.get_device_name()} "
          f"(weights {gb16:.2f} GB BF16, {gb8:.2f} GB FP8)")
    print(f"{'M':>6s} {'bf16 ms':>9s} {'fp8 ms':>9s} {'fp8 GEMM only':>14s} {'fp8 speed-up':>13s} {'lm_head ms':>11s}"
          f" {'bf16 GB/s':>10s} {'fp8 GB/s':>9s}")
    for r in rows:
        print(f"{r['M']:6d} {r['bf16']:9.3f} {r['fp8']:9.3f} {r['fp8_gemm']:14.3f} {r['fp8_speedup']:12.2f}x "
              f"{r['lm_head']:11.3f} {gb16 / r['bf16'] * 1e3:10.0f} {gb8 / r['fp8'] * 1e3:9.0f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "blocks": BLOCKS,
                       "shapes": SHAPES, "weights_gb": {"bf16": gb16, "fp8": gb8}, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
