"""Several checkpoints written together: each into its own staged folder, their tensors from one pass over the
source (``tensors.write_tensors``), then each one's config.json, side files and marker, and each folder swapped in.

A failure leaves every destination as it was (the staged folders are removed). Groups are sized to the free disk
space (``groups``): the checkpoints of a group exist beside the ones they replace until the group is done.
"""

from __future__ import annotations

import errno
import math
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import FP8MixError
from ..progress import Progress, no_progress
from ..timing import Phases
from .folder import staged_dir
from .source import Source, source_files
from .tensors import Output, write_tensors

__all__ = ["Job", "groups", "write_checkpoints"]

DISK_MARGIN = 1.05  # estimated checkpoint bytes times this must fit the free space


@dataclass
class Job:
    """One checkpoint: its destination, its tensors, and what is written beside them once they are (``finish``:
    staged folder and the tensors' summary -> config.json, side files, marker)."""

    out_dir: Path
    output: Output
    finish: Callable[[Path, dict], None]


def estimated_bytes(src: Source, job: Job) -> int:
    """About what the checkpoint's safetensors files take: the source's, one byte less per FP8 weight element."""
    total = sum(f.stat().st_size for f in source_files(src.path))
    return total - sum(math.prod(q.shape) for q in job.output.quant.values())


def groups(src: Source, jobs: list[Job], free: int | None = None) -> list[list[Job]]:
    """The jobs in order, in groups whose estimated bytes fit `free` (default: the free space where the first one
    goes); at least one job a group."""
    if not jobs:
        return []
    if free is None:
        folder = Path(jobs[0].out_dir).parent
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    out, size = [[]], 0
    for job in jobs:
        need = int(estimated_bytes(src, job) * DISK_MARGIN)
        if out[-1] and size + need > free:
            out.append([])
            size = 0
        out[-1].append(job)
        size += need
    return out


def write_checkpoints(src: Source, jobs: list[Job], progress: Progress = no_progress,
                      phases: Phases | None = None) -> None:
    """Write the jobs' checkpoints, reading the source's tensors once; `phases` gets the reading and quantizing,
    each job's ``output.phases`` its writes and files."""
    try:
        with ExitStack() as stack:
            tmps = [stack.enter_context(staged_dir(job.out_dir)) for job in jobs]
            for job, tmp in zip(jobs, tmps):
                job.output.folder = tmp
            summaries = write_tensors(src, [job.output for job in jobs], progress, phases)
            for job, tmp, summary in zip(jobs, tmps, summaries):
                with job.output.phases("files"):
                    job.finish(tmp, summary)
    except OSError as exc:  # the staged folders are removed by now
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        folder = Path(jobs[0].out_dir).parent
        need = sum(estimated_bytes(src, job) for job in jobs)
        raise FP8MixError(f"no space left on the disk of {folder} while writing {len(jobs)} checkpoint(s) of about "
                          f"{need / 2**30:.2f} GiB ({shutil.disk_usage(folder).free / 2**30:.2f} GiB free); "
                          "they were not written (any previous ones are kept)") from None
