"""One vLLM engine at a time in a process that serves several models: started, then shut down fully before the
next one starts (vLLM 0.26 on CUDA and 0.32's CPU build alike).

Standalone, like vllm_live.py beside it (which imports it as a sibling module): it runs in the vLLM venv, where
fp8mix is not installed, and imports only torch, vLLM and the standard library.

Shutting down: the engine core's own `shutdown()` (in both versions: the executor and its workers, the
distributed environment, then vLLM's `cleanup_dist_env_and_memory`, which empties the device cache), then the last
references dropped and collected. A start that raised leaves no engine to shut down, only what it set up, which
`cleanup_dist_env_and_memory` tears down. The process may start another engine only when nothing is left: the
distributed environment torn down and, on CUDA, the memory this process held before the engine back to within
`LEFTOVER_LIMIT`. Otherwise `Engine.leftover` says what is left, and the caller ends the process.
"""
from __future__ import annotations

import gc
import time
import traceback

LEFTOVER_LIMIT = 256 * 2**20  # bytes of CUDA memory an engine may leave allocated (allocator noise, not a model)


def _cuda_allocated() -> int | None:
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return int(torch.cuda.memory_allocated())


class Engine:
    """`with Engine(**llm_kwargs) as engine:` starts `vllm.LLM` (engine.llm) and shuts it down on exit; then
    `engine.leftover` is None when another engine may start in this process, else what was left."""

    def __init__(self, **llm_kwargs) -> None:
        self.kwargs = llm_kwargs
        self.llm = None
        self.leftover: str | None = None
        self.shutdown_s: float | None = None
        self._before = 0

    def __enter__(self) -> "Engine":
        from vllm import LLM

        # Earlier objects (imports, the previous engine's survivors) frozen: the collections inside LLM() skip them.
        gc.freeze()
        self._before = _cuda_allocated() or 0
        try:
            self.llm = LLM(**self.kwargs)
        except BaseException as e:
            traceback.clear_frames(e.__traceback__)  # what the failed start built, freed with the frames' locals
            self._shut_down()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if tb is not None:  # the failed frames' locals may hold the engine's tensors (the exception keeps its text)
            traceback.clear_frames(tb)
        t = time.perf_counter()
        self._shut_down()
        self.shutdown_s = round(time.perf_counter() - t, 2)
        return False

    def _shut_down(self) -> None:
        import torch

        try:
            if self.llm is not None:
                self.llm.llm_engine.engine_core.shutdown()
            else:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
        except Exception as e:  # the engine is in an unknown state: no other engine in this process
            self.llm = None
            self.leftover = f"the engine's shutdown raised {type(e).__name__}: {e}"
            return
        self.llm = None
        gc.unfreeze()
        # Two passes at most: the first runs finalizers that still hold memory (vLLM 0.26's engine keeps its model
        # in one), the second frees what they held.
        left = 0
        for _ in range(2):
            gc.collect()
            if _cuda_allocated() is None:
                break
            torch.cuda.empty_cache()
            left = _cuda_allocated() - self._before
            if left <= LEFTOVER_LIMIT:
                break
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.leftover = "the distributed environment is still initialized after the engine shut down"
        elif left > LEFTOVER_LIMIT:
            self.leftover = f"{left / 2**30:.2f} GiB of CUDA memory still allocated after the engine shut down"
