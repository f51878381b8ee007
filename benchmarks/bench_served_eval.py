#!/usr/bin/env python3
"""Served eval: quality as fp8mix emulates it and as vLLM serves it, and what serving costs, per scheme.

    PYTHONPATH=src python3 benchmarks/bench_served_eval.py --work /tmp/bse [--model M] [--device cuda]
    PYTHONPATH=src python3 benchmarks/bench_served_eval.py --run RUN_DIR      # the table of an existing run

Runs `fp8mix run` with the live check (each checkpoint served once in vLLM; its engine also serves the evaluation
set) and the eval on both engines, then prints one row per model: served quality beside emulated (reply top-k KL,
reply top-1 agreement, answer accuracy, flips vs BF16 on the same engine), the departure verdict the report
gives, and the served cost (engine start and serve seconds of the engine that served the check and the eval).
Needs vLLM importable (its CPU build in .venv-vllm, or vLLM on a GPU). Writes the table as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fp8mix.check.live import read_served  # noqa: E402
from fp8mix.report.served import departures  # noqa: E402


def table(run: Path) -> list[dict]:
    ev = json.loads((run / "eval.json").read_text())
    emulated = {r["scheme"]: r for r in ev["rows"] if r["engine"] == "transformers"}
    served = {r["scheme"]: r for r in ev["rows"] if r["engine"] == "vllm"}
    rows = []
    for name, e in emulated.items():
        s = served.get(name, {})
        doc = read_served(run, name) or {}
        t = doc.get("timings_s", {})
        rows.append({
            "scheme": name, "served": bool(s.get("served")), "why_not": s.get("reason") or s.get("error"),
            "emulated_reply_topk_kl": e["kl_topk_reply_mean"], "served_reply_topk_kl": s.get("kl_topk_reply_mean"),
            "emulated_reply_top1": e["top1_reply_agreement"], "served_reply_top1": s.get("top1_reply_agreement"),
            "emulated_accuracy": e["answer_accuracy"], "served_accuracy": s.get("answer_accuracy"),
            "emulated_flips": e["flips_vs_bf16"], "served_flips": s.get("flips_vs_bf16"),
            "departs": departures(e, s) if s.get("served") and name != "bf16" else None,
            "engine_start_s": t.get("load"), "serve_s": t.get("serve"), "requests": len(doc.get("outputs", {})),
        })
    return rows


def show(rows: list[dict], n: int) -> None:
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    print(f"\n{'scheme':24s} {'KL emu':>9s} {'KL srv':>9s} {'top1 emu':>8s} {'top1 srv':>8s} {'acc emu':>7s} "
          f"{'acc srv':>7s} {'flips e/s':>9s} {'start s':>7s} {'serve s':>7s}  verdict")
    for r in rows:
        verdict = ("not served: " + str(r["why_not"])) if not r["served"] else (
            "—" if r["departs"] is None else ("DEPARTS: " + "; ".join(r["departs"]) if r["departs"] else "within noise"))
        print(f"{r['scheme']:24s} {f(r['emulated_reply_topk_kl'], '9.3g')} {f(r['served_reply_topk_kl'], '9.3g')} "
              f"{f(r['emulated_reply_top1'], '8.4f')} {f(r['served_reply_top1'], '8.4f')} "
              f"{f(r['emulated_accuracy'], '7.3f')} {f(r['served_accuracy'], '7.3f')} "
              f"{r['emulated_flips']:>4}/{f(r['served_flips'], '<4')} {f(r['engine_start_s'], '7.1f')} "
              f"{f(r['serve_s'], '7.1f')}  {verdict}")
    print(f"({n} held-out samples; KL: reply top-20 KL vs BF16 on the same engine)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_served_eval"))
    ap.add_argument("--run", type=Path, default=None, help="print the table of this run, run nothing")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench_served_eval.json"))
    args = ap.parse_args(argv)
    run = args.run
    stages = {}
    if run is None:
        run = args.work / "run"
        cmd = [sys.executable, "-m", "fp8mix", "run", "--out", str(run), "--device", args.device, "--no-study",
               "--eval-samples", str(args.eval_samples)] + (["--model", args.model] if args.model else [])
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode:
            print(f"fp8mix run exited {proc.returncode}", file=sys.stderr)
        stages = {k: v.get("seconds") for k, v in json.loads((run / "run.json").read_text())["stages"].items()}
        stages["total"] = round(time.time() - t0, 1)
        eval_stage = json.loads((run / "run.json").read_text())["stages"].get("eval", {})
        stages["eval_engines"] = eval_stage.get("engine_seconds")
    rows = table(run)
    n = json.loads((run / "eval.json").read_text())["n_samples"]
    show(rows, n)
    if stages:
        print("stages (s):", stages)
    args.out.write_text(json.dumps({"run": str(run), "n_samples": n, "stages": stages, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
