"""The live vLLM check: vllm_live.py run in an interpreter where vLLM is importable (this one, or .venv-vllm)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).with_name("vllm_live.py")
REPO_VENV = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"
# vLLM's CPU build runs per-channel/per-token FP8 only (per-tensor and block scales need GPU kernels)
CPU_FORMATS = {"fp8_dynamic"}


def vllm_python() -> str | None:
    """FP8MIX_VLLM_PYTHON, else this interpreter if it has vLLM, else the repository's .venv-vllm."""
    env = os.environ.get("FP8MIX_VLLM_PYTHON")
    if env:
        return env
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return str(REPO_VENV) if REPO_VENV.is_file() else None


def run_live(folder: Path, expect_fp8: list[str], expect_bf16: list[str], timeout: int = 900) -> dict:
    py = vllm_python()
    if py is None:
        return {"ran": False, "ok": None, "reason": "vLLM is not importable here and .venv-vllm is missing "
                                                      "(make vllm-env builds it)"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "live.json"
        cmd = [py, str(SCRIPT), "--model", str(folder), "--out", str(out)]
        if expect_fp8:
            cmd += ["--expect-fp8", ",".join(expect_fp8)]
        if expect_bf16:
            cmd += ["--expect-bf16", ",".join(expect_bf16)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ran": True, "ok": False, "reason": f"vLLM did not finish within {timeout} s"}
        if not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"ran": True, "ok": False, "reason": f"vLLM exited {proc.returncode}: {' | '.join(tail)}"}
        result = json.loads(out.read_text())
    result.pop("layers_detail", None)
    return {"ran": True, "ok": bool(result.get("ok")), "vllm_version": result.get("vllm_version"),
            "errors": result.get("errors", []), "warnings": result.get("warnings", [])[:20],
            "generations": result.get("generations", {}), "layers": result.get("layers", {}),
            "timings_s": result.get("timings_s", {})}
