"""vLLM as a served engine: vllm_live.py run in an interpreter where vLLM is importable (this one, or .venv-vllm).

One `Runner.serve` call is one engine start: it loads a model folder (a checkpoint or the BF16 source), checks its
layers, and answers a `RequestSet` of chat samples (greedy replies, prompt logprobs, teacher-forced continuations).
A `Runner` is one process that serves several folders in turn (vLLM imported once); `serve` is one folder in a
process of its own. The live check and served evaluations put their requests into the same set, so a checkpoint is
loaded once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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
    """A hash of the runner script and its sibling modules: a cached served output is stale when they changed."""
    parts = [SCRIPT, SCRIPT.with_name("vllm_layers.py"), SCRIPT.with_name("vllm_engine.py")]
    return hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()[:16]


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


class Runner:
    """One vLLM process (vllm_live.py --jobs under `vllm_python()`) that serves model folders in turn: vLLM is
    imported once, each model gets its own engine, shut down fully before the next one starts. Started at the first
    `serve` (or `start`), ended by `close` (`with Runner() as runner:`).

    Each model's result comes back as soon as it is served, so a later failure loses nothing already served. A model
    whose engine crashed the process, ran past `timeout` seconds or could not be shut down cleanly is recorded for
    that model, and the next model gets a fresh process."""

    def __init__(self, timeout: int = 900) -> None:
        self.timeout = timeout
        self.processes = 0      # processes started so far
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._jobs = 0
        self._buffer = b""
        self._log: Path | None = None

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(kill=exc_type is not None)  # interrupted: do not wait for the model in progress

    def start(self) -> bool:
        """Start the process now (it imports vLLM while the caller prepares requests); False without vLLM."""
        py = vllm_python()
        if py is None:
            return False
        if self._proc is not None and self._proc.poll() is not None:  # ended between models (killed, out of memory)
            self._end(kill=False)
        if self._proc is None:
            self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="fp8mix-vllm-")
            self._log = Path(self._tmp.name) / f"vllm-{self.processes}.log"
            with open(self._log, "wb") as log:
                self._proc = subprocess.Popen([py, str(SCRIPT), "--jobs"], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=log, start_new_session=True)
            self._buffer = b""
            self.processes += 1
        return True

    def serve(self, folder: Path, requests: RequestSet | None = None, expect_fp8: list[str] = (),
              expect_bf16: list[str] = (), engine: dict | None = None, timeout: int | None = None) -> dict:
        """Serve `folder` (`engine`: `engine_settings`, default for 1024-token samples), check the layer
        expectations, answer `requests`.

        Returns the runner's result (see vllm_live.py) with "ran"; on a crash or a timeout, "ok" False and one line
        in "errors"."""
        try:
            if not self.start():
                return {"ran": False, "ok": None, "errors": [],
                        "reason": "vLLM is not importable here and .venv-vllm is missing (make vllm-env builds it)"}
        except OSError as e:
            return {"ran": True, "ok": False, "errors": [f"vLLM's interpreter could not be started: {e}"]}
        timeout = timeout or self.timeout
        engine = engine or engine_settings(1024)
        self._jobs += 1
        job_dir = Path(self._tmp.name) / f"job-{self._jobs}"
        out = job_dir / "result.json"
        job = {"model": str(folder), "out": str(out), "expect_fp8": list(expect_fp8),
               "expect_bf16": list(expect_bf16), **engine}
        if requests is not None and requests.requests:
            job["requests"] = str(requests.write(job_dir / "requests"))
        try:
            reply = self._send(job, time.monotonic() + timeout)
        except TimeoutError:
            self._end(kill=True)
            return {"ran": True, "ok": False, "errors": [f"vLLM did not finish within {timeout} s"]}
        finally:
            shutil.rmtree(job_dir / "requests", ignore_errors=True)
        if reply is None or reply.get("leftover"):  # the process ended or is ending: the next model gets a new one
            rc = self._end(kill=False)
            if not out.is_file():
                tail = self._log.read_text(errors="replace").strip().splitlines()[-3:]
                return {"ran": True, "ok": False, "errors": [f"vLLM exited {rc}: {' | '.join(tail)}"]}
        result = json.loads(out.read_text())
        shutil.rmtree(job_dir, ignore_errors=True)
        result.pop("traceback", None)
        if reply and reply.get("leftover"):
            result["warnings"] = [*result.get("warnings", []), f"the engine did not shut down cleanly "
                                  f"({reply['leftover']}): the next model is served by a new process"]
        return {"ran": True, **result}

    def _send(self, job: dict, deadline: float) -> dict | None:
        """Send one job and wait for its reply line; None when the process ended without one."""
        try:
            self._proc.stdin.write((json.dumps(job) + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            return None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return None
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _end(self, kill: bool) -> int | None:
        """End the process: it exits at the end of its input, once the model in progress is served (killed with its
        whole process group at once when `kill`, or after a minute). Returns its exit status."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            if not kill:
                try:
                    return proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return proc.wait()
        finally:
            proc.stdout.close()

    def close(self, kill: bool = False) -> None:
        """End the process (it has shut each engine down already) and remove the request files."""
        self._end(kill)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def serve(folder: Path, requests: RequestSet | None = None, expect_fp8: list[str] = (),
          expect_bf16: list[str] = (), engine: dict | None = None, timeout: int = 900) -> dict:
    """Serve one model in a process of its own (see `Runner.serve`)."""
    with Runner(timeout) as runner:
        return runner.serve(folder, requests, expect_fp8, expect_bf16, engine)


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
    """Keep what vLLM served for `name` ("bf16" for the source): checks/served/<name>.json, stamped with the
    runner's digest (`served_is_current`)."""
    write_json(run / SERVED_DIR / f"{name}.json", "served", {**doc, "runner": runner_digest()})


def served_is_current(doc: dict, version: str | None) -> bool:
    """Whether a served document came from this runner and vLLM `version` (`vllm_version`): outputs of another
    vLLM or runner are served again, not compared with new ones."""
    return doc.get("runner") == runner_digest() and version is not None and doc.get("vllm_version") == version


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
