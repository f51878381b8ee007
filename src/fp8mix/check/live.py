"""vLLM as a served engine: vllm_live.py run in an interpreter where vLLM is importable (this one, or .venv-vllm).

One `serve` call is one engine start: it loads a model folder (a checkpoint or the BF16 source), checks its layers,
and answers a `RequestSet` of chat samples (greedy replies, prompt logprobs, teacher-forced continuations). The live
check and served evaluations put their requests into the same set, so a checkpoint is loaded once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..data.samples import ChatSample
from ..errors import FP8MixError
from ..rundir import read_json, write_json

SCRIPT = Path(__file__).with_name("vllm_live.py")
REPO_VENV = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"
# vLLM's CPU build runs per-channel/per-token FP8 only (per-tensor and block scales need GPU kernels)
CPU_FORMATS = {"fp8_dynamic"}
# Room beyond the longest fitted sample: its greedy reply (evaluate.accuracy.REPLY_TOKENS) and the probes' replies
GENERATION_ROOM = 64
MAX_NUM_SEQS = 16
SERVED_DIR = Path("checks") / "served"


def engine_settings(max_length: int) -> dict:
    """The runner's engine flags for a run whose samples are fitted to `max_length` tokens (part of a cached
    reference's key): the context holds the longest sample plus its greedy reply."""
    return {"max_model_len": int(max_length) + GENERATION_ROOM, "max_num_seqs": MAX_NUM_SEQS}


def vllm_python() -> str | None:
    """FP8MIX_VLLM_PYTHON, else this interpreter if it has vLLM, else the repository's .venv-vllm."""
    env = os.environ.get("FP8MIX_VLLM_PYTHON")
    if env:
        return env
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return str(REPO_VENV) if REPO_VENV.is_file() else None


def vllm_version(py: str) -> str | None:
    """The vLLM version installed for interpreter `py`, from its package metadata (no vLLM import)."""
    code = ("import importlib.metadata as m\n"
            "d = (m.packages_distributions().get('vllm') or ['vllm'])[0]\n"
            "print(m.version(d))")
    try:
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def runner_digest() -> str:
    """A hash of the runner script: a cached served output is stale when the runner changed."""
    return hashlib.sha256(SCRIPT.read_bytes() + SCRIPT.with_name("vllm_layers.py").read_bytes()).hexdigest()[:16]


class RequestSet:
    """Chat requests for one engine start (the runner's request file; see vllm_live.py for the format)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self._images: dict[str, object] = {}   # file name -> PIL image

    def _image_names(self, sample: ChatSample) -> list[str]:
        digest = sample.fingerprint()[:20]
        names = []
        for i, img in enumerate(sample.images):
            name = f"{digest}_{i}.png"
            self._images[name] = img
            names.append(name)
        return names

    def add_reply(self, rid: str, sample: ChatSample, max_tokens: int, *, continuation=None,
                  continuation_logprobs: int = 5) -> None:
        """The greedy reply to the sample's prompt (its messages up to the last assistant turn); `continuation`
        (token ids, or "generated" for the reply itself) is scored teacher-forced after the prompt."""
        req = {"id": rid, "messages": sample.prompt_messages(), "images": self._image_names(sample),
               "add_generation_prompt": True, "max_tokens": int(max_tokens)}
        if continuation is not None:
            req["continuation"] = continuation if continuation == "generated" else [int(t) for t in continuation]
            req["continuation_logprobs"] = int(continuation_logprobs)
        self._add(req)

    def add_conversation(self, rid: str, sample: ChatSample, top_k: int = 5) -> None:
        """Top-k prompt logprobs over the sample's whole conversation (assistant reply included)."""
        self._add({"id": rid, "messages": sample.messages, "images": self._image_names(sample),
                   "add_generation_prompt": False, "max_tokens": 0, "prompt_logprobs": int(top_k)})

    def _add(self, req: dict) -> None:
        if any(r["id"] == req["id"] for r in self.requests):
            raise ValueError(f"duplicate request id {req['id']}")
        self.requests.append(req)

    def extend(self, other: "RequestSet") -> "RequestSet":
        for r in other.requests:
            self._add(r)
        self._images.update(other._images)
        return self

    def key(self) -> str:
        """A hash of the requests; image file names carry the samples' pixel fingerprints."""
        return hashlib.sha256(json.dumps(self.requests, sort_keys=True).encode()).hexdigest()[:16]

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for name, img in self._images.items():
            img.save(folder / name, format="PNG")  # lossless: vLLM sees fp8mix's pixels
        path = folder / "requests.json"
        path.write_text(json.dumps({"requests": self.requests}, indent=1))
        return path


def serve(folder: Path, requests: RequestSet | None = None, expect_fp8: list[str] = (),
          expect_bf16: list[str] = (), engine: dict | None = None, timeout: int = 900) -> dict:
    """Start vLLM once on `folder` (`engine`: `engine_settings`, default for 1024-token samples), check the layer
    expectations, answer `requests`.

    Returns the runner's result (see vllm_live.py) with "ran"; on a crash or a timeout, "ok" False and one line
    in "errors"."""
    py = vllm_python()
    if py is None:
        return {"ran": False, "ok": None, "errors": [],
                "reason": "vLLM is not importable here and .venv-vllm is missing (make vllm-env builds it)"}
    with tempfile.TemporaryDirectory(prefix="fp8mix-vllm-") as tmp:
        out = Path(tmp) / "result.json"
        engine = engine or engine_settings(1024)
        cmd = [py, str(SCRIPT), "--model", str(folder), "--out", str(out),
               "--max-model-len", str(engine["max_model_len"]), "--max-num-seqs", str(engine["max_num_seqs"])]
        if requests is not None and requests.requests:
            cmd += ["--requests", str(requests.write(Path(tmp) / "requests"))]
        if expect_fp8:
            cmd += ["--expect-fp8", ",".join(expect_fp8)]
        if expect_bf16:
            cmd += ["--expect-bf16", ",".join(expect_bf16)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ran": True, "ok": False, "errors": [f"vLLM did not finish within {timeout} s"]}
        if not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"ran": True, "ok": False, "errors": [f"vLLM exited {proc.returncode}: {' | '.join(tail)}"]}
        result = json.loads(out.read_text())
    result.pop("traceback", None)
    return {"ran": True, **result}


def folder_key(folder: Path) -> str:
    """What identifies the model in `folder` for its served outputs: a checkpoint's export key (its
    fp8mix_plan.json: the key decides every byte the export wrote), else the source's fingerprint. Served outputs
    recorded under another key belong to another model and are never reused."""
    from ..export.marker import MARKER
    from ..models.loading import fingerprint

    marker = Path(folder) / MARKER
    if marker.is_file():
        doc = json.loads(marker.read_text())
        return doc.get("export_key") or hashlib.sha256(marker.read_bytes()).hexdigest()
    return fingerprint(Path(folder))


def write_served(run: Path, name: str, doc: dict) -> None:
    """Keep what vLLM served for `name` ("bf16" for the source): checks/served/<name>.json."""
    write_json(run / SERVED_DIR / f"{name}.json", "served", doc)


def read_served(run: Path, name: str) -> dict | None:
    """The served document of `name` (see `write_served`), or None when there is none."""
    path = run / SERVED_DIR / f"{name}.json"
    return read_json(path, "served") if path.is_file() else None


def served_outputs(run: Path, name: str) -> dict:
    """The outputs vLLM served for `name` ("bf16" for the source) in the last check, by request id."""
    doc = read_served(run, name)
    if doc is None:
        raise FP8MixError(f"{run / SERVED_DIR / (name + '.json')} is missing: run fp8mix check with vLLM first")
    return doc["outputs"]
