#!/usr/bin/env python3
"""GPU benchmark: AutoQuant gradient scoring across GPUs — data parallel (torchrun, NCCL), one model spread
over several GPUs (accelerate device map), and both together.

Run on a machine with 2 or 4 CUDA GPUs, from the repository root::

    PYTHONPATH=src python3 benchmarks/bench_scale.py --out bench_scale.json

``--tiny`` runs the same code on 2-layer models on the CPU (gloo, every replica on the CPU) as a dry run.

Every run is ``torchrun`` with one model replica per process (``--worker``), over that process's share of the
visible GPUs (``fp8mix.distributed.local_gpus``, as ``fp8mix score --gpus N [--device-map auto]`` splits
them): random BF16 weights built on the meta device, placed as transformers' ``device_map="auto"`` places them
(accelerate's ``get_balanced_memory`` + ``infer_auto_device_map`` with the model's ``_no_split_modules``),
materialized with ``to_empty`` on each device and initialized by the model's own ``_init_weights`` (which also
recomputes the rotary buffers), dispatched with accelerate's hooks when spread over several GPUs; then scored by
``fp8mix.score.autoquant.gradient_scores`` (fp8_dynamic, ``_scaled_mm`` fast path). The global batches are the
same in every run of an architecture (one 448x448 image per sample; built as in bench_scoring.py); rank r scores
batches r, r+N, … (fp8mix's own sharding, ``distributed.shard``) and the scores are all-reduced inside
``gradient_scores``. One warm-up batch per rank first; tokens/s = all tokens / wall time of the call between two
barriers; peaks = ``torch.cuda.max_memory_allocated`` per GPU.

* ``dp``: the 7B architecture, 1, 2 and (with 4 GPUs) 4 processes of one GPU each; 16 batches of 4 x 512 tokens.
* ``devmap``: the 72B architecture, 1 process over 2 GPUs, ``--low-memory`` (FP8 weights quantized on use);
  8 batches of 2 x 512 tokens.
* ``hybrid`` (4 GPUs): the same 72B run as 2 processes over 2 GPUs each.

Scaling efficiency = tokens/s(N replicas) / (N x tokens/s(1 replica)). The per-module scores of every run are
compared with the first run of its architecture (Spearman rho); the peaks with ``fp8mix info``'s estimate.
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
from fp8mix import distributed  # noqa: E402
from fp8mix.score.autoquant import gradient_scores  # noqa: E402
from fp8mix.quant.numerics import FP8Format  # noqa: E402

CONFIGS = REPO / "src" / "fp8mix" / "models" / "configs"


def arch_config(name: str, tiny: bool) -> dict:
    return load_config(tiny, CONFIGS / f"qwen2_5_vl_{name}.json")


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


# ---------------------------------------------------------------------------------------------- worker
def place(model, gpus: list[int]) -> dict:
    """The device map transformers' device_map="auto" would make over these GPUs (accelerate's balanced memory,
    the model's _no_split_modules), or the one GPU."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if len(gpus) == 1:
        return {"": gpus[0]}
    max_memory = {i: torch.cuda.get_device_properties(i).total_memory for i in gpus}
    no_split = model._no_split_modules
    balanced = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                   dtype=torch.bfloat16)
    return infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=torch.bfloat16)


def worker(args) -> None:
    """One replica per process (torchrun), over this process's share of the visible GPUs (fp8mix's local_gpus)."""
    from accelerate import dispatch_model

    cpu = args.tiny
    distributed.init("cpu" if cpu else "cuda")
    cfg = arch_config(args.arch, args.tiny)
    model = meta_model(cfg)
    device_map = {"": "cpu"} if cpu else place(model, distributed.local_gpus())
    t = time.perf_counter()
    materialize(model, device_map)
    if cpu:
        model.float()
    elif len(set(device_map.values())) > 1:
        model = dispatch_model(model, device_map)
    build_s = time.perf_counter() - t
    first = model.get_input_embeddings().weight.device
    devices = sorted({p.device for p in model.parameters()}, key=str)
    groups = list(Qwen2_5_VLAdapter().layout(model).groups)
    batches = make_batches(cfg, args.batches, args.batch_size, args.seq, args.image, torch.device("cpu"), seed=1)
    warm = make_batches(cfg, distributed.world_size(), args.batch_size, args.seq, args.image, torch.device("cpu"),
                        seed=2)
    mine = [{k: v.to(first) for k, v in b.items()} for b in distributed.shard(batches)]
    my_warm = [{k: v.to(first) for k, v in b.items()} for b in distributed.shard(warm)]
    cache = not args.low_memory
    gradient_scores(model, groups, my_warm, FP8Format.fp8_dynamic, cache_weights=cache)
    cuda = [d for d in devices if d.type == "cuda"]
    for d in cuda:
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
    distributed.barrier()
    t = time.perf_counter()
    scores = gradient_scores(model, groups, mine, FP8Format.fp8_dynamic, cache_weights=cache)
    for d in cuda:
        torch.cuda.synchronize(d)
    distributed.barrier()
    seconds = time.perf_counter() - t
    peaks = [torch.cuda.max_memory_allocated(d) for d in cuda]
    gathered = [None] * distributed.world_size()
    if distributed.active():
        torch.distributed.all_gather_object(gathered, peaks)
    else:
        gathered = [peaks]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    if distributed.is_main():
        Path(args.json).write_text(json.dumps({
            "arch": args.arch, "processes": distributed.world_size(), "gpus_per_process": len(cuda),
            "low_memory": args.low_memory, "build_s": build_s, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "peak_bytes_per_gpu": [p for ps in gathered for p in ps],
            "estimate_bytes_per_replica": expected_score_bytes(model, args.batch_size * args.seq, args.low_memory),
            "scores": scores}))
    distributed.close()


def launch(args, label: str, procs: int, gpus: int, arch: str, batches: int, batch_size: int, seq: int,
           low_memory: bool) -> dict:
    """torchrun with `procs` processes over the first `gpus` GPUs."""
    out = Path(args.scratch) / f"{label}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", __file__,
           "--worker", "1", "--json", str(out), "--arch", arch, "--batches", str(batches),
           "--batch-size", str(batch_size), "--seq", str(seq), "--image", str(args.image)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--low-memory"] if low_memory else []
    path = [str(REPO / "src"), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": ":".join(p for p in path if p), "OMP_NUM_THREADS": "1"}
    if not args.tiny:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    rec = json.loads(out.read_text())
    rec["command_s"] = time.perf_counter() - t
    rec["label"] = label
    return rec


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_scale.json")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--phases", default="dp,devmap,hybrid")
    ap.add_argument("--dp-arch", default="7b")
    ap.add_argument("--dp-batches", type=int, default=16)
    ap.add_argument("--dp-batch-size", type=int, default=4)
    ap.add_argument("--dp-seq", type=int, default=512)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--devmap-arch", default="72b")
    ap.add_argument("--devmap-batches", type=int, default=8)
    ap.add_argument("--devmap-batch-size", type=int, default=2)
    ap.add_argument("--devmap-seq", type=int, default=512)
    ap.add_argument("--scratch", default="/tmp")
    # worker arguments
    ap.add_argument("--worker")
    ap.add_argument("--json")
    ap.add_argument("--arch")
    ap.add_argument("--batches", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--low-memory", action="store_true")
    args = ap.parse_args()
    if args.tiny:
        args.dp_seq, args.devmap_seq, args.image = min(args.dp_seq, 128), min(args.devmap_seq, 128), 112
    if args.worker:
        return worker(args)

    gpus = torch.cuda.device_count()
    machine = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else "CPU"
    doc = {"date": datetime.date.today().isoformat(), "machine": machine, "torch": torch.__version__,
           "args": vars(args), "runs": [], "not_run": []}
    out = Path(args.out)
    avail = 4 if args.tiny else gpus
    dp = (args.dp_arch, args.dp_batches, args.dp_batch_size, args.dp_seq, False)
    big = (args.devmap_arch, args.devmap_batches, args.devmap_batch_size, args.devmap_seq, True)
    plan = []
    if "dp" in args.phases:
        plan += [(f"dp {args.dp_arch}: {n} x 1 GPU", n, n, dp) for n in (1, 2, 4) if n <= avail]
    if "devmap" in args.phases:
        plan += [(f"devmap {args.devmap_arch}: 1 x 2 GPUs", 1, 2, big)] if avail >= 2 else []
    if "hybrid" in args.phases:
        plan += [(f"hybrid {args.devmap_arch}: 2 x 2 GPUs", 2, 4, big)] if avail >= 4 else []
    for phase, need in (("dp", 2), ("devmap", 2), ("hybrid", 4)):
        if phase in args.phases and avail < need:
            doc["not_run"].append(f"{phase}: needs {need} GPUs, this machine has {gpus}")
    for label, procs, ngpu, (arch, nb, bs, seq, low) in plan:
        doc["runs"].append(launch(args, label.split(":")[0].replace(" ", "_") + f"_{procs}x{ngpu}", procs, ngpu,
                                  arch, nb, bs, seq, low) | {"label": label})
        out.write_text(json.dumps(doc, indent=2))
    runs = {r["label"]: r for r in doc["runs"]}
    from scipy.stats import spearmanr

    def eff(a: str, b: str, k: int) -> float | None:
        return runs[b]["tokens_per_s"] / (k * runs[a]["tokens_per_s"]) if a in runs and b in runs else None

    base = f"dp {args.dp_arch}: 1 x 1 GPU"
    doc["efficiency"] = {f"{args.dp_arch} 2 vs 1 GPU": eff(base, f"dp {args.dp_arch}: 2 x 1 GPU", 2),
                         f"{args.dp_arch} 4 vs 1 GPU": eff(base, f"dp {args.dp_arch}: 4 x 1 GPU", 4),
                         f"{args.devmap_arch} 2 replicas vs 1 (2 GPUs each)":
                             eff(f"devmap {args.devmap_arch}: 1 x 2 GPUs", f"hybrid {args.devmap_arch}: 2 x 2 GPUs", 2)}
    rhos = {}
    for r in doc["runs"]:
        ref = runs[base if r["arch"] == args.dp_arch else f"devmap {args.devmap_arch}: 1 x 2 GPUs"]
        names = sorted(ref["scores"])
        rhos[r["label"]] = float(spearmanr([ref["scores"][n] for n in names],
                                           [r["scores"][n] for n in names]).statistic)
    doc["spearman_vs_first"] = rhos
    for r in doc["runs"]:
        r.pop("scores")
    out.write_text(json.dumps(doc, indent=2))
    print(f"\n{machine}, torch {torch.__version__}")
    print(f"{'run (replicas x GPUs each)':34} {'tokens':>7} {'s':>7} {'tok/s':>8} {'peak GiB per GPU':>24} "
          f"{'est./replica':>12} {'rho':>6}")
    for r in doc["runs"]:
        peaks = "/".join(f"{p / 2**30:.1f}" for p in r["peak_bytes_per_gpu"]) or "-"
        print(f"{r['label']:34} {r['tokens']:>7} {r['seconds']:>7.2f} {r['tokens_per_s']:>8.0f} {peaks:>24} "
              f"{r['estimate_bytes_per_replica'] / 2**30:>12.1f} {rhos[r['label']]:>6.4f}")
    for k, v in doc["efficiency"].items():
        if v is not None:
            print(f"scaling efficiency, {k}: {v:.3f}")
    for line in doc["not_run"]:
        print("not run:", line)


if __name__ == "__main__":
    main()
