#!/usr/bin/env python3
"""GPU benchmark: fp8mix eval at the full-size Qwen2.5-VL-3B architecture (hub layout, random BF16 weights, the
embedded model's tokenizer and processor). Measures what eval's memory bound costs:

* the swap of one scheme into the model (``evaluate.checkpoint.scheme_applied``: one read of its checkpoint,
  FP8 layers in, then out again), for the full-FP8 and the top-50 % checkpoints exported by fp8mix;
* ``evaluate.metrics.evaluate`` on N realistic samples (a 448 x 448 photo and about 1.3 k tokens each) and both
  schemes, after a warm-up, with a budget that holds the whole set (the behaviour before the budget, in the
  model's dtype), the default budget, and a budget of one batch: wall time, swaps, CPU peak resident memory above
  the start (VmHWM, reset through /proc/self/clear_refs; the pages of the checkpoint being read count too), GPU
  peak.

Run on a CUDA machine from the repository root::

    PYTHONPATH=src:tests python3 benchmarks/bench_eval.py --work /tmp/bench_eval --out bench_eval.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO / "src", REPO / "tests", REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_vllm import write_model_dir  # noqa: E402
from uniform_plans import uniform_plan  # noqa: E402

SCHEMES = ("fp8_autoquant_full", "fp8_autoquant_top50")


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def build(work: Path) -> tuple[Path, dict[str, Path]]:
    """The random 3B model folder and its exported schemes (reused when already there)."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from fp8mix.export import export_checkpoint

    model_dir = work / "model"
    if not (model_dir / "model.safetensors.index.json").is_file():
        write_model_dir(model_dir)
        cfg = AutoConfig.from_pretrained(model_dir)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(model_dir, max_shard_size="4GB")
        del model
        torch.cuda.empty_cache()
    ckpts = {}
    for name in SCHEMES:
        out = work / "checkpoints" / name
        if not (out / "config.json").is_file():
            t = time.perf_counter()
            export_checkpoint(str(model_dir), uniform_plan(model_dir, name), out)
            print(f"export {name}: {time.perf_counter() - t:.1f} s", flush=True)
        ckpts[name] = out
    return model_dir, ckpts


def samples(n: int):
    """n samples of about 1 k tokens: a 448 x 448 photo, a long passage to continue, a long reply."""
    from fp8mix.data import real
    from fp8mix.data.samples import ChatSample, assistant_turn, user_turn

    paras = real.text_paragraphs("eval")
    names = real.EVAL_PHOTOS
    out = []
    for i in range(n):
        img = real._photo(names[i % len(names)]).resize((448, 448))
        text = " ".join(paras[(5 * i + k) % len(paras)] for k in range(10))[:3600]
        reply = " ".join(paras[(5 * i + k + 3) % len(paras)] for k in range(6))[:1800]
        out.append(ChatSample([user_turn("Continue the text: " + text, 1), assistant_turn(reply)], [img], None,
                              "bench"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_eval"))
    ap.add_argument("--out", type=Path, default=Path("bench_eval.json"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--skip-whole-set", action="store_true", help="leave out the run that holds the whole set")
    args = ap.parse_args()

    from fp8mix.evaluate.checkpoint import scheme_applied
    from fp8mix.evaluate.metrics import REFERENCE_BUDGET, counted_positions, evaluate, placeholder_ids
    from fp8mix.models import loading
    from fp8mix.score.batches import make_batches

    t0 = time.perf_counter()
    model_dir, ckpts = build(args.work)
    res = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "samples": args.samples, "build_seconds": round(time.perf_counter() - t0, 1)}
    loaded = loading.load(str(model_dir), device="cuda")
    model, proc, adapter = loaded.model, loaded.processor, loaded.adapter

    swaps = {}
    for name, ckpt in ckpts.items():
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with scheme_applied(model, ckpt, adapter):
                torch.cuda.synchronize()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        swaps[name] = {"seconds": [round(x, 3) for x in times],
                       "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))}
    res["swap"] = swaps

    data = samples(args.samples)
    per_batch = [data[k:k + 8] for k in range(0, len(data), 8)]
    make = lambda s: make_batches(proc, s, len(s), 4096, "cuda")[0]  # noqa: E731
    first = make(per_batch[0])
    text = int(counted_positions(first, placeholder_ids(model.config))[0].sum())
    head = model.get_output_embeddings().weight
    res["batch"] = {"tokens": int(first["attention_mask"].sum()), "text_positions": text,
                    "reference_bytes": text * head.shape[0] * head.element_size(), "shape": list(first["input_ids"].shape)}

    def timed_scheme(name, log):
        @contextlib.contextmanager
        def swap():
            torch.cuda.synchronize()
            t = time.perf_counter()
            with scheme_applied(model, ckpts[name], adapter):
                log.append(time.perf_counter() - t)
                yield

        return swap

    evaluate(model, proc, per_batch[:1], make, {n: timed_scheme(n, []) for n in SCHEMES})  # warm-up
    runs = {}
    for label, budget in (("whole set held", 1 << 50), ("default budget", REFERENCE_BUDGET),
                          ("one batch per chunk", 1)):
        if args.skip_whole_set and label == "whole set held":
            continue
        log: list[float] = []
        torch.cuda.reset_peak_memory_stats()
        base = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        torch.cuda.synchronize()
        t = time.perf_counter()
        rows = evaluate(model, proc, per_batch, make, {n: timed_scheme(n, log) for n in SCHEMES},
                        reference_budget=budget)
        torch.cuda.synchronize()
        runs[label] = {"budget": budget, "seconds": round(time.perf_counter() - t, 2), "swaps": len(log),
                       "swap_in_seconds": round(sum(log), 2),
                       "cpu_peak_above_start_gb": round((status("VmHWM") - base) / 1e9, 2),
                       "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                       "kl_mean_full": rows["fp8_autoquant_full"]["kl_mean"],
                       "n_text_positions": rows["bf16"]["n_text_positions"]}
        print(label, runs[label], flush=True)
    res["evaluate"] = runs
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
