"""The embedded model's held-out accuracy in transformers (fp8mix's eval path) and served by vLLM, side by side.

    .venv/bin/python benchmarks/embedded_accuracy.py [--n 512] [--out FILE.json]

Held-out shapes questions (`data.shapes`, split "eval"), greedy replies, normalised answer accuracy
(`evaluate.accuracy.accuracy_of`), with the true images and with the images shuffled across samples. transformers:
the shipped BF16 weights as `models.loading` loads them (computed in FP32 on a CPU). vLLM: the same folder served
by `check.live.serve` (one engine start for both image orders; .venv-vllm's CPU build here). Prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fp8mix.check.live import RequestSet, serve  # noqa: E402
from fp8mix.data import shapes  # noqa: E402
from fp8mix.evaluate.accuracy import REPLY_TOKENS, accuracy_of, greedy_replies, normalise, with_shuffled_images  # noqa: E402
from fp8mix.models import loading  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    held_out = shapes.samples("eval", args.n)
    sets = {"true images": held_out, "images shuffled": with_shuffled_images(held_out)}

    t = time.time()
    loaded = loading.load(None)
    hf = {k: greedy_replies(loaded.model, loaded.processor, s) for k, s in sets.items()}
    hf_s = time.time() - t

    t = time.time()
    req = RequestSet()
    for k, s in sets.items():
        for i, sample in enumerate(s):
            req.add_reply(f"{k}/{i}", sample, REPLY_TOKENS)
    res = serve(loading.EMBEDDED, req)
    if not res.get("ok"):
        raise SystemExit(f"vLLM failed: {res.get('errors') or res.get('reason')}")
    served = {k: [res["outputs"][f"{k}/{i}"]["text"].strip() for i in range(len(s))] for k, s in sets.items()}
    vllm_s = time.time() - t

    rows = {}
    for k, s in sets.items():
        a, b = accuracy_of(hf[k], s), accuracy_of(served[k], s)
        same = sum(normalise(x) == normalise(y) for x, y in zip(hf[k], served[k]))
        rows[k] = {"transformers": a["answer_accuracy"], "vllm": b["answer_accuracy"], "same_answer": same / len(s)}
    doc = {"n": args.n, "rows": rows, "vllm_version": res.get("vllm_version"), "transformers_s": round(hf_s, 1),
           "vllm_s": round(vllm_s, 1)}
    print(f"{'held-out shapes questions':28} {'transformers':>12} {'vLLM':>8} {'same answer':>12}")
    for k, r in rows.items():
        print(f"{k + f' ({args.n})':28} {r['transformers']:12.1%} {r['vllm']:8.1%} {r['same_answer']:12.1%}")
    print(f"vLLM {doc['vllm_version']}; transformers {hf_s:.0f} s, vLLM {vllm_s:.0f} s (engine start included)")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
