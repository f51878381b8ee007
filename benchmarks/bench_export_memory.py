#!/usr/bin/env python3
"""Export memory at full size: a random-weight checkpoint of a family architecture, saved in shards of
``--shard-size``, exported with the catalog's full scheme; peak resident memory above the start against the
largest input shard (the measurement of tests/export/export_memory.py, which runs one warm-up export first).

    PYTHONPATH=src python3 benchmarks/bench_export_memory.py --arch 7b --shard-size 5GB --work /tmp/xm

``--tiny`` shrinks the architecture to 2 layers (a dry run). The weights are built on a GPU when there is one and
saved from CPU memory; the export itself runs on the CPU, as `fp8mix export` does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO / "src", REPO / "tests", REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_scale import arch_config, materialize, meta_model  # noqa: E402
from random_models import add_embedded_processor  # noqa: E402
from uniform_plans import write_uniform_plan  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="7b")
    ap.add_argument("--shard-size", default="5GB")
    ap.add_argument("--work", default="/tmp/export_memory")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    model_dir = work / "model"
    t = time.perf_counter()
    model = meta_model(arch_config(args.arch, args.tiny))
    materialize(model, {"": 0 if torch.cuda.is_available() else "cpu"})
    model.to("cpu").save_pretrained(model_dir, max_shard_size=args.shard_size)
    del model
    add_embedded_processor(model_dir)
    build_s = time.perf_counter() - t
    plan = write_uniform_plan(model_dir, work / "plan.json")
    r = subprocess.run([sys.executable, str(REPO / "tests" / "export" / "export_memory.py"), str(model_dir),
                        str(plan), str(work / "out")], capture_output=True, text=True, check=True)
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    doc.update(arch=args.arch, tiny=args.tiny, shard_size=args.shard_size, build_s=round(build_s, 1),
               input_bytes=sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
               output_bytes=sum(f.stat().st_size for f in (work / "out").glob("*.safetensors")),
               ratio=doc["peak_above_start"] / doc["largest_shard"])
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"{args.arch}{' (tiny)' if args.tiny else ''}: {doc['shards']} input shards, "
          f"{doc['input_bytes'] / 1e9:.2f} GB in, {doc['output_bytes'] / 1e9:.2f} GB out, largest shard "
          f"{doc['largest_shard'] / 1e9:.2f} GB; export {doc['seconds']:.1f} s; peak resident memory above the start "
          f"{doc['peak_above_start'] / 1e9:.2f} GB = {doc['ratio']:.2f}x the largest shard (bound 2x)")


if __name__ == "__main__":
    main()
