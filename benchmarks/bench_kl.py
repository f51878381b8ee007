"""Cost of the KL sensitivity pass (the study's kl_div config) against the gradient pass, at full size.

    PYTHONPATH=src python3 benchmarks/bench_kl.py [--tiny] [--batches 4] [--out FILE.json]

The Qwen2.5-VL-3B architecture (`src/fp8mix/models/configs/qwen2_5_vl_3b.json`) with random BF16 weights on the GPU,
batches synthesized as in bench_scoring.py (4 x 512 tokens, one 448x448 image each, `mm_token_type_ids` given).
Times, in one process on the same batches: the gradient pass (`gradient_scores`), the KL pass with full forwards,
and the KL pass that replays the vision tower and the blocks before each group from the BF16 pass. Checks that the
two KL passes give the same scores. `--tiny`: a 2-layer model on the CPU (a dry run). Prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scoring import build_model, load_config, make_batches, timed  # noqa: E402

from fp8mix.models import Qwen2_5_VLAdapter  # noqa: E402
from fp8mix.quant.numerics import FP8Format  # noqa: E402
from fp8mix.score.autoquant import gradient_scores, kl_scores  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    cfg = load_config(args.tiny)
    model = build_model(cfg, device)
    adapter = Qwen2_5_VLAdapter()
    groups = list(adapter.layout(model).groups)
    seq, image = (128, 56) if args.tiny else (512, 448)
    batches = make_batches(cfg, args.batches, 4, seq, image, device, seed=0)
    warm = make_batches(cfg, 1, 4, seq, image, device, seed=1)
    fmt = FP8Format.fp8_dynamic
    layers, vision = model.get_submodule(adapter.blocks_path), model.get_submodule(adapter.vision_path)
    gradient_scores(model, groups, warm, fmt)  # warm-up: kernels, allocator
    rows = {}
    _, rows["gradient"], _ = timed(device, lambda: gradient_scores(model, groups, batches, fmt))
    full, rows["kl_full_forward"], _ = timed(device, lambda: kl_scores(model, groups, batches, fmt))
    replayed, rows["kl_replayed"], _ = timed(
        device, lambda: kl_scores(model, groups, batches, fmt, layers=layers, vision=vision))
    rel = max(abs(full[k] - replayed[k]) / max(abs(full[k]), 1e-30) for k in full)
    doc = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "groups": len(groups),
           "batches": args.batches, "seconds": rows, "kl_max_rel_diff": rel,
           "ratio_to_gradient": {k: v / rows["gradient"] for k, v in rows.items()}}
    print(f"{doc['device']}: {len(groups)} groups, {args.batches} batches of 4 x {seq} tokens with images")
    print(f"{'pass':18} {'seconds':>8} {'÷ gradient':>11}")
    for k, v in rows.items():
        print(f"{k:18} {v:8.2f} {v / rows['gradient']:11.2f}")
    print(f"KL replayed vs full forward: max relative difference {rel:.2e}")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
