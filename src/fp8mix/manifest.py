"""run.json: what ran, with which versions, seeds, model and device, and how long each stage took."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .rundir import read_json, write_json

KIND = "run"


def versions() -> dict:
    import compressed_tensors
    import torch
    import transformers

    return {"fp8mix": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "compressed_tensors": compressed_tensors.__version__}


def hardware(device: str) -> str:
    import os

    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} ({torch.cuda.device_count()} GPU(s))"
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def load(run: Path) -> dict:
    path = run / "run.json"
    return read_json(path, KIND) if path.is_file() else {"stages": {}}


def update(run: Path, **fields) -> dict:
    """Merge fields into run.json (stages merge per stage name)."""
    doc = load(run)
    doc.pop("schema", None)
    stages = doc.get("stages", {})
    stages.update(fields.pop("stages", {}))
    doc.update(fields)
    doc["stages"] = stages
    doc["versions"] = versions()
    doc["command"] = " ".join(["fp8mix", *sys.argv[1:]])
    doc["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(run / "run.json", KIND, doc)
    return doc
