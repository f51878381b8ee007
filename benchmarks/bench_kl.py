"""Cost of the KL sensitivity pass (the study's kl_div config) against the gradient pass, at full size.

    PYTHONPATH=src python3 benchmarks/bench_kl.py [--tiny [--full-vocab]] [--batches 4] [--seq N --image PX]
                                                  [--layers N] [--vocab N] [--vision-depth N]
                                                  [--passes gradient,kl_definition,kl_no_replay,kl,control]
                                                  [--out FILE.json]

The Qwen2.5-VL-3B architecture (`src/fp8mix/models/configs/qwen2_5_vl_3b.json`) with random BF16 weights on the GPU,
batches synthesized as in bench_scoring.py (4 x 512 tokens, one 448x448 image each, `mm_token_type_ids` given).
Times, in one process on the same batches: the gradient pass (`gradient_scores`); the KL score computed straight
from its definition (`tests/score/kl_reference.py`: a full forward per group, full logits, KL summed over the text
positions); fp8mix's KL pass without replay (full forwards, but the lm_head and the KL only at the text positions,
a slice at a time); fp8mix's KL pass as scoring runs it, which also replays the vision tower and the blocks
before each group from the BF16 pass; and the study's control on the same batches (`--passes ...,control`).
Checks that the KL passes give the definition's scores (when the definition is among `--passes`). `--tiny`: a
2-layer model on the CPU (a dry run; `--full-vocab` keeps the 151,936-token vocabulary). Without CUDA the model
runs in float32 (as fp8mix runs models on CPUs). `--layers`, `--vocab` and `--vision-depth` shrink the 3B
architecture for a CPU run at full width: with fewer layers a smaller vocabulary keeps the share of the lm_head in
the KL pass as at 36 layers (special tokens move to the top of the vocabulary). Runs on older fp8mix code too
(PYTHONPATH), for before/after figures. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "benchmarks", REPO / "tests" / "score"):
    sys.path.insert(0, str(_p))

from bench_scoring import build_model, load_config, make_batches, timed  # noqa: E402

from fp8mix.models import Qwen2_5_VLAdapter  # noqa: E402
from fp8mix.quant.numerics import FP8Format  # noqa: E402
from fp8mix.score.autoquant import gradient_scores, kl_scores  # noqa: E402
from kl_reference import kl_scores_reference  # noqa: E402

PASSES = ("gradient", "kl_definition", "kl_no_replay", "kl", "control")
FULL_VOCAB_KEYS = ("vocab_size", "bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id",
                   "vision_token_id", "image_token_id", "video_token_id")


def run_control(model, adapter, batches, fmt) -> dict:
    """The study's control on these batches, blocks ranked by index (the figures are compared between runs; the
    vision tower and the decoder blocks are passed where this fp8mix's control takes them)."""
    import inspect

    from fp8mix.score.study import control

    layout = adapter.layout(model)
    doc = {"blocks": [{"block": b, "rank": b} for b in range(layout.n_blocks)]}
    kw = {}
    if "layers" in inspect.signature(control).parameters:
        kw = dict(layers=model.get_submodule(adapter.blocks_path), vision=model.get_submodule(adapter.vision_path))
    return control(model, layout, doc, batches, fmt, 0, **kw)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--full-vocab", action="store_true", help="with --tiny: the 151,936-token vocabulary")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seq", type=int, help="tokens per sample (default 512, 128 with --tiny)")
    ap.add_argument("--image", type=int, help="image side in pixels, a multiple of 28 (default 448, 56 with --tiny)")
    ap.add_argument("--layers", type=int, help="LM blocks (default: the architecture's)")
    ap.add_argument("--vocab", type=int, help="vocabulary size (special tokens moved to its top)")
    ap.add_argument("--vision-depth", type=int, help="vision tower blocks (default: the architecture's)")
    ap.add_argument("--passes", default=",".join(PASSES), help="which passes to time, comma separated")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    passes = [p for p in args.passes.split(",") if p]
    if set(passes) - set(PASSES) or "gradient" not in passes:
        raise SystemExit(f"--passes takes gradient (always) and any of {', '.join(PASSES[1:])}")
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    cfg = load_config(args.tiny)
    if args.full_vocab:
        full = load_config(False)
        cfg.update({k: full[k] for k in FULL_VOCAB_KEYS})
    if args.layers:
        cfg.update(num_hidden_layers=args.layers, max_window_layers=args.layers)
        cfg.pop("layer_types", None)
    if args.vision_depth:
        vc = cfg["vision_config"]
        vc.update(depth=args.vision_depth, fullatt_block_indexes=[i for i in vc["fullatt_block_indexes"]
                                                                   if i < args.vision_depth] or [0])
    if args.vocab:
        top = args.vocab - 8
        cfg.update(vocab_size=args.vocab, **{k: top + i for i, k in enumerate(FULL_VOCAB_KEYS[1:])})
    model = build_model(cfg, device)
    if device.type == "cpu":
        model = model.float()
    adapter = Qwen2_5_VLAdapter()
    groups = list(adapter.layout(model).groups)
    seq, image = args.seq or (128 if args.tiny else 512), args.image or (56 if args.tiny else 448)
    batches = make_batches(cfg, args.batches, 4, seq, image, device, seed=0)
    warm = make_batches(cfg, 1, 4, seq, image, device, seed=1)
    fmt = FP8Format.fp8_dynamic
    layers, vision = model.get_submodule(adapter.blocks_path), model.get_submodule(adapter.vision_path)
    gradient_scores(model, groups, warm, fmt)  # warm-up: kernels, allocator
    run = {"gradient": lambda: gradient_scores(model, groups, batches, fmt),
           "kl_definition": lambda: kl_scores_reference(model, groups, batches, fmt),
           "kl_no_replay": lambda: kl_scores(model, groups, batches, fmt),
           "kl": lambda: kl_scores(model, groups, batches, fmt, layers=layers, vision=vision),
           "control": lambda: run_control(model, adapter, batches, fmt)}
    rows, scores, peaks = {}, {}, {}
    for name in passes:
        scores[name], rows[name], peaks[name] = timed(device, run[name])
        print(f"{name}: {rows[name]:.2f} s", flush=True)
    scores.pop("gradient")
    control = scores.pop("control", None)
    want = scores.get("kl_definition")
    rel = {} if want is None else {
        k: max(abs(v[m] - want[m]) / max(abs(want[m]), 1e-30) for m in want) for k, v in scores.items()
        if k != "kl_definition"}
    doc = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "groups": len(groups),
           "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"],
           "batches": args.batches, "seq": seq, "image_px": image, "vocab": cfg["vocab_size"], "seconds": rows,
           "peak_gib": peaks, "kl_max_rel_diff_to_definition": rel, "control": control,
           "ratio_to_gradient": {k: v / rows["gradient"] for k, v in rows.items()}}
    print(f"{doc['device']}: {len(groups)} groups ({cfg['num_hidden_layers']} blocks of width {cfg['hidden_size']}), "
          f"{args.batches} batches of 4 x {seq} tokens with a {image} px image each, vocabulary {cfg['vocab_size']}")
    print(f"{'pass':14} {'seconds':>8} {'÷ gradient':>11} {'peak GiB':>9}")
    for k, v in rows.items():
        peak = "-" if peaks[k] is None else f"{peaks[k]:.2f}"
        print(f"{k:14} {v:8.2f} {v / rows['gradient']:11.2f} {peak:>9}")
    for k, v in rel.items():
        print(f"{k} vs the definition: max relative difference {v:.2e}")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
