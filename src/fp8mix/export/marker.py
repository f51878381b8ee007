"""``fp8mix_plan.json``: what a checkpoint was written from, and the key that says whether it is up to date.

The export key hashes everything that decides an export's bytes (the plan, the writer, the export version, the
model fingerprint and, for fp8_static, the calibration settings): the export stage keeps a checkpoint whose marker
records the key it would write.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import FP8MixError
from ..rundir import dumps, read_json, write_json
from .prepare import plan_format
from .source import Source

__all__ = ["EXPORT_VERSION", "MARKER", "export_key", "plan_sha256", "read_marker", "write_marker"]

EXPORT_VERSION = 1          # bump when the bytes an export writes change for the same plan and model
MARKER = "fp8mix_plan.json"


def plan_sha256(plan: dict) -> str:
    doc = {k: v for k, v in plan.items() if k != "schema"}
    return hashlib.sha256(dumps(doc).encode()).hexdigest()


def export_key(plan: dict, fmt_name: str, fingerprint: str, calibration: dict | None) -> str:
    """What decides an export's bytes: the plan, the writer, the model and (fp8_static) the calibration."""
    doc = {"plan": plan_sha256(plan), "format": fmt_name, "export_version": EXPORT_VERSION,
           "model_fingerprint": fingerprint, "calibration": calibration}
    return hashlib.sha256(dumps(doc).encode()).hexdigest()


def write_marker(out_dir: Path, src: Source, plan: dict, fmt_name: str, calibration: dict | None,
                 summary: dict) -> None:
    from .. import __version__

    write_json(out_dir / MARKER, "export", {
        "scheme": plan["scheme"], "format": fmt_name, "fp8_format": plan_format(plan).value,
        "plan_sha256": plan_sha256(plan), "export_key": export_key(plan, fmt_name, src.fingerprint, calibration),
        "export_version": EXPORT_VERSION, "fp8mix_version": __version__,
        "model": {"id": src.model_id, "fingerprint": src.fingerprint}, "calibration": calibration,
        "fp8_modules": len(plan["fp8_modules"]), "tensors": summary})


def read_marker(out_dir: Path) -> dict | None:
    """The marker of the checkpoint at out_dir, or None when it has none (or not a readable one)."""
    try:
        return read_json(Path(out_dir) / MARKER, "export")
    except FP8MixError:
        return None
