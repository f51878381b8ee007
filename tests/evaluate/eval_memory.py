"""Measure the CPU memory eval takes: `python eval_memory.py BUDGET N [N ...]`.

Prints JSON: for each N (a multiple of 8), the peak resident memory while `evaluate` runs BF16 and one scheme on
N samples (the first 8 embedded eval samples, repeated: every batch the same, so that a larger set brings no
longer batch), above the resident memory after a warm-up run (Linux: the VmHWM high-water mark is reset through
/proc/self/clear_refs before each run, then read back), and the bytes that the BF16 reference logits of all N
samples take (what holding the reference for the whole set would cost). BUDGET is the reference budget in bytes.
"""

import contextlib
import gc
import json
import sys
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(budget: int, sizes: list[int]) -> None:
    import torch

    torch.set_num_threads(1)
    from fp8mix.data import sources
    from fp8mix.evaluate.metrics import counted_positions, evaluate, placeholder_ids
    from fp8mix.models import loading
    from fp8mix.score.batches import make_batches

    loaded = loading.load(None)
    model, proc = loaded.model, loaded.processor
    head = model.get_output_embeddings().weight
    per_position = head.shape[0] * head.element_size()

    def run(n: int) -> int:
        samples = sources.embedded("eval", 8) * (n // 8)  # equal batches: the same working memory per batch
        batch_samples = [samples[k:k + 8] for k in range(0, n, 8)]
        evaluate(model, proc, batch_samples, lambda s: make_batches(proc, s, 8, 1024)[0],
                 {"same": contextlib.nullcontext}, reference_budget=budget)
        positions = [counted_positions(make_batches(proc, s, 8, 1024)[0], placeholder_ids(model.config))[0]
                     for s in batch_samples]
        return sum(int(p.sum()) for p in positions) * per_position

    run(8)  # warm-up: lazy imports, allocator pools, generation caches
    gc.collect()
    base = _status("VmRSS")
    out = {}
    for n in sizes:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
        reference = run(n)
        out[n] = {"peak_above_base": _status("VmHWM") - base, "reference_bytes": reference}
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(n) for n in sys.argv[2:]])
