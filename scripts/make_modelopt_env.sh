#!/usr/bin/env bash
# Build .venv-modelopt: NVIDIA ModelOpt 0.47.0 + transformers 5.14.1 + torch 2.13.0 (CPU), the environment in
# which tests/parity/modelopt_scores.py computes reference AutoQuantize scores. Separate from .venv because
# modelopt 0.47 caps transformers below 5.15 while fp8mix uses 5.23.
#
# Idempotent: a stamp file records a hash of the pinned requirements and of this script; when it matches and
# the venv imports, nothing is done. Unattended: no prompts, fails loudly (set -e) on any error.
#
#   bash scripts/make_modelopt_env.sh            # or: make modelopt-env
#   PYTHON=python3.11 MODELOPT_VENV=.venv-modelopt bash scripts/make_modelopt_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${MODELOPT_VENV:-.venv-modelopt}"
REQ=scripts/modelopt-requirements.txt
STAMP="$VENV/.installed"
PIP_VERSION=26.3

want="$(cat "$REQ" "$0" | sha256sum | cut -c1-16)"
smoke() {
  "$VENV/bin/python" - <<'EOF'
import pulp, torch, transformers, modelopt, modelopt.torch.quantization  # noqa: F401
assert transformers.__version__.startswith("5.14."), transformers.__version__
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert pulp.PULP_CBC_CMD(msg=False).available(), "PuLP's bundled CBC solver is not runnable"
print(f"modelopt {modelopt.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
EOF
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && smoke >/dev/null 2>&1; then
  echo "$VENV is up to date"
  exit 0
fi

start=$SECONDS
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "pip==$PIP_VERSION"
# torch first and alone: with pip's find-links (this machine kind's pip config) torch==2.13.0 resolves to the
# local 2.13.0+cpu wheel; a resolver run that pulled torch in as a dependency could fetch a multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0"
"$VENV/bin/python" -c "import torch, sys; v = torch.__version__; print('torch', v); \
  v.endswith('+cpu') or print('warning: torch is not the CPU build (no local wheel found?)', file=sys.stderr)"
"${PIP[@]}" -r "$REQ"
"$VENV/bin/python" -m pip check
smoke
echo "$want" > "$STAMP"
echo "$VENV ready in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1))"
