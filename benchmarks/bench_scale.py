#!/usr/bin/env python3
"""GPU benchmark: AutoQuant gradient scoring across GPUs — data parallel (torchrun, NCCL) and one model spread
over several GPUs (accelerate device map).

Run on a machine with 2+ CUDA GPUs, from the repository root::

    PYTHONPATH=src python3 benchmarks/bench_scale.py --out bench_scale.json

``--tiny`` runs the same code on a 2-layer model on the CPU (gloo; the device-map phase on one device) as a dry run.

Phases (each prints a row; the JSON is written after each):

* ``dp``: the 7B architecture (``qwen2_5_vl_7b.json``), random BF16 weights built on each GPU, scored by
  ``fp8mix.score.autoquant.gradient_scores`` (fp8_dynamic, ``_scaled_mm`` fast path) under ``torchrun`` with 1 and
  with 2 processes, one GPU each. The global batches are the same in both runs (``--batches`` batches of
  ``--batch-size`` x ``--seq`` tokens, one 448x448 image per sample; built as in bench_scoring.py); rank r scores
  batches r, r+N, … (fp8mix's own sharding, ``distributed.shard``) and the scores are all-reduced inside
  ``gradient_scores``. One warm-up batch per rank first. Tokens/s = all tokens / wall time of the call between two
  barriers. Scaling efficiency = tokens/s(2) / (2 x tokens/s(1)). The per-module scores of the two runs are
  compared (Spearman rho of 196 modules). The 1-GPU peak memory is compared with ``fp8mix info``'s estimate.
* ``devmap``: the 72B architecture (``qwen2_5_vl_72b.json``) in one process over all visible GPUs: built on the
  meta device, placed by accelerate (``get_balanced_memory`` + ``infer_auto_device_map`` with the model's
  ``_no_split_modules``: what transformers' ``device_map="auto"`` does), materialized with ``to_empty`` on each
  device and initialized by the model's own ``_init_weights``, dispatched with accelerate's hooks, then scored
  with ``--low-memory`` semantics (FP8 weights quantized on use). Tokens/s and each GPU's peak memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO / "src", REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_scoring import load_config, make_batches  # noqa: E402

from fp8mix.models import Qwen2_5_VLAdapter, sizing  # noqa: E402
from fp8mix.score import distributed  # noqa: E402
from fp8mix.score.autoquant import gradient_scores  # noqa: E402
from fp8mix.score.fp8 import FP8Format  # noqa: E402

CONFIGS = REPO / "src" / "fp8mix" / "models" / "configs"


def arch_config(name: str, tiny: bool) -> dict:
    import bench_scoring

    bench_scoring.CONFIG = CONFIGS / f"qwen2_5_vl_{name}.json"
    return load_config(tiny)


def meta_model(cfg: dict):
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with init_empty_weights(include_buffers=True):
        model = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig.from_dict(cfg), dtype=torch.bfloat16,
                                                                attn_implementation="sdpa")
    return model


def materialize(model, device_map: dict) -> None:
    """Meta → empty tensors on the mapped devices (each on its longest matching device-map entry), then the model's
    own _init_weights (which also recomputes the rotary buffers). The family's 7B and 72B do not tie lm_head."""
    def device_of(name: str):
        key = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
        dev = device_map[key]
        return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)

    torch.manual_seed(0)
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                mod._parameters[pname] = torch.nn.Parameter(torch.empty_like(p, device=device_of(prefix + pname)),
                                                            requires_grad=p.requires_grad)
        for bname, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[bname] = torch.empty_like(b, device=device_of(prefix + bname))
    with torch.no_grad():
        for m in model.modules():
            model._init_weights(m)
    model.eval()


def expected_score_bytes(model, cfg_tokens: int, low_memory: bool) -> int:
    layout = Qwen2_5_VLAdapter().layout(model)
    stages = sizing.needs(layout, sizing.Dims.of(model.config), cfg_tokens, None)
    return [s for s in stages if s.stage == ("score --low-memory" if low_memory else "score (gradient)")][0].bytes


# ---------------------------------------------------------------------------------------------- dp worker
def worker_dp(args) -> None:
    cpu = args.tiny
    device = torch.device(distributed.init("cpu" if cpu else "cuda"))
    if device.type == "cuda" and device.index is None:  # one process: not launched as a group
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = arch_config(args.arch, args.tiny)
    model = meta_model(cfg)
    materialize(model, {"": device.index if device.type == "cuda" else "cpu"})
    if cpu:
        model.float()
    groups = list(Qwen2_5_VLAdapter().layout(model).groups)
    batches = make_batches(cfg, args.batches, args.batch_size, args.seq, args.image, torch.device("cpu"), seed=1)
    warm = make_batches(cfg, distributed.world_size(), args.batch_size, args.seq, args.image, torch.device("cpu"),
                        seed=2)
    mine = [{k: v.to(device) for k, v in b.items()} for b in distributed.shard(batches)]
    my_warm = [{k: v.to(device) for k, v in b.items()} for b in distributed.shard(warm)]
    gradient_scores(model, groups, my_warm, FP8Format.fp8_dynamic)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    distributed.barrier()
    t = time.perf_counter()
    scores = gradient_scores(model, groups, mine, FP8Format.fp8_dynamic)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    distributed.barrier()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    peaks = [None] * distributed.world_size()
    if distributed.active():
        torch.distributed.all_gather_object(peaks, peak)
    else:
        peaks = [peak]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    if distributed.is_main():
        Path(args.json).write_text(json.dumps({
            "processes": distributed.world_size(), "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "peak_bytes_per_gpu": peaks,
            "estimate_bytes": expected_score_bytes(model, args.batch_size * args.seq, low_memory=False),
            "scores": scores}))
    distributed.close()


def run_dp(args, n: int) -> dict:
    out = Path(args.scratch) / f"dp{n}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
           "--worker", "dp", "--json", str(out), "--arch", args.arch, "--batches", str(args.batches),
           "--batch-size", str(args.batch_size), "--seq", str(args.seq), "--image", str(args.image)]
    if args.tiny:
        cmd.append("--tiny")
    path = [str(REPO / "src"), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": ":".join(p for p in path if p), "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    rec = json.loads(out.read_text())
    rec["command_s"] = time.perf_counter() - t
    return rec


# ---------------------------------------------------------------------------------------------- device map
def run_devmap(args) -> dict:
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    cfg = arch_config(args.devmap_arch, args.tiny)
    model = meta_model(cfg)
    if args.tiny:
        device_map = {"": "cpu"}
    else:
        gpus = list(range(torch.cuda.device_count()))
        max_memory = {i: torch.cuda.get_device_properties(i).total_memory for i in gpus}
        no_split = model._no_split_modules
        balanced = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                       dtype=torch.bfloat16)
        device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split,
                                           dtype=torch.bfloat16)
    t = time.perf_counter()
    materialize(model, device_map)
    if args.tiny:
        model.float()
    else:
        model = dispatch_model(model, device_map)
    build_s = time.perf_counter() - t
    first = model.get_input_embeddings().weight.device
    groups = list(Qwen2_5_VLAdapter().layout(model).groups)
    batches = make_batches(cfg, args.devmap_batches, args.devmap_batch_size, args.devmap_seq, args.image, first, 3)
    warm = make_batches(cfg, 1, args.devmap_batch_size, args.devmap_seq, args.image, first, 4)
    gradient_scores(model, groups, warm, FP8Format.fp8_dynamic, cache_weights=False)
    devices = sorted({p.device for p in model.parameters()}, key=str)
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)
            torch.cuda.reset_peak_memory_stats(d)
    t = time.perf_counter()
    gradient_scores(model, groups, batches, FP8Format.fp8_dynamic, cache_weights=False)
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)
    seconds = time.perf_counter() - t
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    placed = {}
    for name, dev in device_map.items():
        placed[str(dev)] = placed.get(str(dev), 0) + 1
    return {"arch": args.devmap_arch, "devices": [str(d) for d in devices], "device_map_entries": placed,
            "build_s": build_s, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "peak_bytes_per_gpu": {str(d): torch.cuda.max_memory_allocated(d) for d in devices if d.type == "cuda"},
            "estimate_bytes": expected_score_bytes(model, args.devmap_batch_size * args.devmap_seq, low_memory=True)}


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_scale.json")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--phases", default="dp,devmap")
    ap.add_argument("--arch", default="7b")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--devmap-arch", default="72b")
    ap.add_argument("--devmap-batches", type=int, default=4)
    ap.add_argument("--devmap-batch-size", type=int, default=2)
    ap.add_argument("--devmap-seq", type=int, default=512)
    ap.add_argument("--scratch", default="/tmp")
    ap.add_argument("--worker")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.tiny:
        args.seq, args.devmap_seq, args.image = min(args.seq, 128), min(args.devmap_seq, 128), 112
    if args.worker == "dp":
        return worker_dp(args)

    gpus = torch.cuda.device_count()
    machine = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else "CPU"
    doc = {"date": datetime.date.today().isoformat(), "machine": machine, "torch": torch.__version__,
           "args": vars(args), "not_run": []}
    out = Path(args.out)
    rows = []
    if "dp" in args.phases:
        if gpus < 2 and not args.tiny:
            doc["not_run"].append(f"dp: needs 2 GPUs, this machine has {gpus}")
        else:
            one = run_dp(args, 1)
            two = run_dp(args, 2)
            from scipy.stats import spearmanr

            names = sorted(one["scores"])
            rho = float(spearmanr([one["scores"][n] for n in names], [two["scores"][n] for n in names]).statistic)
            eff = two["tokens_per_s"] / (2 * one["tokens_per_s"])
            doc["dp"] = {"one": {k: v for k, v in one.items() if k != "scores"},
                         "two": {k: v for k, v in two.items() if k != "scores"},
                         "scaling_efficiency": eff, "spearman_scores_1_vs_2": rho}
            for label, r in (("1 process", one), ("2 processes", two)):
                peak = r["peak_bytes_per_gpu"][0]
                rows.append((f"dp {args.arch} {label}", r["tokens"], r["seconds"], r["tokens_per_s"],
                             "/".join(f"{p / 2**30:.1f}" for p in r["peak_bytes_per_gpu"] if p),
                             f"{r['estimate_bytes'] / 2**30:.1f}" if peak else "-"))
            out.write_text(json.dumps(doc, indent=2))
    if "devmap" in args.phases:
        if gpus < 2 and not args.tiny:
            doc["not_run"].append(f"devmap: needs 2+ GPUs, this machine has {gpus}")
        else:
            r = run_devmap(args)
            doc["devmap"] = r
            rows.append((f"devmap {r['arch']} over {len(r['devices'])} device(s)", r["tokens"], r["seconds"],
                         r["tokens_per_s"], "/".join(f"{p / 2**30:.1f}" for p in r["peak_bytes_per_gpu"].values()),
                         f"{r['estimate_bytes'] / 2**30:.1f}"))
    out.write_text(json.dumps(doc, indent=2))
    print(f"\n{machine}, torch {torch.__version__}")
    print(f"{'phase':42} {'tokens':>8} {'s':>8} {'tok/s':>9} {'peak GiB/GPU':>16} {'est. GiB':>9}")
    for r in rows:
        print(f"{r[0]:42} {r[1]:>8} {r[2]:>8.2f} {r[3]:>9.0f} {r[4]:>16} {r[5]:>9}")
    if "dp" in doc:
        print(f"scaling efficiency 2 vs 1 process: {doc['dp']['scaling_efficiency']:.3f} (goal >= 0.85); "
              f"Spearman rho of the scores, 1 vs 2: {doc['dp']['spearman_scores_1_vs_2']:.4f}")
    for line in doc["not_run"]:
        print("not run:", line)


if __name__ == "__main__":
    main()
