"""Work counts of the KL pass that do not need a GPU: padded tokens of the calibration batches in order and by
length, and aten operations (about one GPU kernel launch each) and host synchronizations per batch of the gradient
pass and the KL pass.

    PYTHONPATH=src python3 benchmarks/count_kl_work.py [--processor DIR] [--samples 128] [--layers 36]

`--processor`: a model folder whose processor encodes the default `real` calibration samples (for the 3B figures:
the hub-layout folder bench_run.py writes, with the real Qwen tokenizer; default: the embedded model's). The
operations are counted on the 3B architecture's depth (`--layers`) at a small width (bench_scoring's --tiny
sizes: the count does not depend on the width), one batch of 8 synthesized samples of 128 tokens with a
56 px image each, on the CPU. Runs on older fp8mix code too (PYTHONPATH), for before/after counts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))


class Count(TorchDispatchMode):
    """aten operations dispatched, and those that read a value back to the host (`.item()`, `.tolist()`)."""

    def __init__(self):
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def padded_tokens(processor_dir: str | None, samples: int) -> dict:
    from fp8mix.models import loading
    from fp8mix.score.batches import calibration_samples, fitted, make_batches
    from fp8mix.score.settings import AutoQuantSettings

    loaded = loading.load(processor_dir)
    s = AutoQuantSettings(data="real", calib_samples=samples)
    out = {}
    for name, by_length in (("in order", False), ("by length", True)):
        try:
            kept, _ = fitted(loaded.processor, calibration_samples(s), s.max_pixels, s.max_length, "c", by_length)
        except TypeError:  # older code: no by_length
            kept, _ = fitted(loaded.processor, calibration_samples(s), s.max_pixels, s.max_length, "c")
        batches = make_batches(loaded.processor, kept, s.batch_size, s.max_length)
        out[name] = {"real": sum(int(b["attention_mask"].sum()) for b in batches),
                     "padded": sum(b["attention_mask"].numel() for b in batches)}
    return out


def operations(layers: int) -> dict:
    from bench_scoring import build_model, load_config, make_batches
    from fp8mix.models import Qwen2_5_VLAdapter
    from fp8mix.quant.numerics import FP8Format
    from fp8mix.score.autoquant import gradient_scores, kl_scores

    cfg = load_config(True)
    cfg.update(num_hidden_layers=layers, max_window_layers=layers)
    cfg.pop("layer_types", None)
    model = build_model(cfg, torch.device("cpu")).float()
    adapter = Qwen2_5_VLAdapter()
    groups = list(adapter.layout(model).groups)
    batches = make_batches(cfg, 1, 8, 128, 56, torch.device("cpu"), seed=0)
    kw = dict(layers=model.get_submodule(adapter.blocks_path), vision=model.get_submodule(adapter.vision_path))
    out = {}
    for name, fn in (("gradient", lambda: gradient_scores(model, groups, batches, FP8Format.fp8_dynamic)),
                     ("kl", lambda: kl_scores(model, groups, batches, FP8Format.fp8_dynamic, **kw))):
        c = Count()
        with c:
            fn()
        out[name] = {"aten_ops": c.ops, "host_syncs": c.syncs}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processor", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--layers", type=int, default=36)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    for name, c in padded_tokens(args.processor, args.samples).items():
        print(f"batches {name:9}: {c['real']:,} tokens, {c['padded']:,} with padding "
              f"({c['real'] / c['padded']:.0%} real)")
    for name, c in operations(args.layers).items():
        print(f"{name:8} pass, one batch of 8 at {args.layers} blocks: {c['aten_ops']:,} aten ops, "
              f"{c['host_syncs']:,} host syncs")


if __name__ == "__main__":
    main()
