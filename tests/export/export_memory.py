"""Measure the CPU memory an export takes: `python export_memory.py MODEL_DIR|embedded PLAN.json OUT_DIR`.

Prints JSON: the peak resident memory during export_checkpoint above the resident memory just before it (Linux:
the VmHWM high-water mark is reset through /proc/self/clear_refs, then read back; where that is not allowed, the
resident size is sampled every millisecond), and the largest input shard.
Resident memory counts the pages of the memory-mapped input shard that were read, as well as the tensors held.
A first export to a scratch folder runs before the measured one, so that the libraries it imports once (tokenizer,
processor, compressed-tensors) are not counted: what is measured is what an export holds for the weights."""

import json
import sys
import time
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class _Sampler:
    """The largest VmRSS seen every millisecond, in a thread."""

    def __init__(self):
        import threading

        self.peak, self.done = _status("VmRSS"), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done:
            self.peak = max(self.peak, _status("VmRSS"))
            time.sleep(0.001)

    def stop(self) -> int:
        self.done = True
        self.thread.join()
        return max(self.peak, _status("VmRSS"))


def main(model: str, plan_file: str, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    from fp8mix.export import export_checkpoint
    from fp8mix.export.source import source_files, source_of
    from fp8mix.models import loading

    arg = None if model == "embedded" else model
    plan = json.loads(Path(plan_file).read_text())
    shards = source_files(source_of(arg).path)
    export_checkpoint(arg, plan, Path(out + ".warmup"))
    before = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
        sampler = None
    except OSError:  # not allowed here: sample the resident size instead (may miss a short peak)
        sampler = _Sampler()
    t = time.perf_counter()
    export_checkpoint(arg, plan, Path(out))
    seconds = time.perf_counter() - t
    peak = _status("VmHWM") if sampler is None else sampler.stop()
    print(json.dumps({"peak_above_start": peak - before, "largest_shard": max(f.stat().st_size for f in shards),
                      "shards": len(shards), "seconds": round(seconds, 2), "model": str(loading.resolve(None if model == "embedded" else model)[1])}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
