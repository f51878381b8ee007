# Two entry points: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# The embedded model on a 2-core CPU: fewer samples than the catalog's 128 keep the whole run near a minute.
DEMO_ARGS ?= --calib-samples 32 --eval-samples 32 --control-samples 16

demo: $(STAMP)
	$(VENV)/bin/fp8mix run --out runs/demo $(DEMO_ARGS)

# The whole suite, including the ModelOpt parity test and the live vLLM checks, whose environments are built
# on demand (.venv-modelopt about 1.5 min, .venv-vllm about 3-5 min on a fresh machine).
test: $(STAMP) modelopt-env vllm-env
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache

# vLLM CPU venv (.venv-vllm) for the live vLLM load-and-generate check; ~6.2 GB, a few minutes; idempotent.
.PHONY: vllm-env
vllm-env:
	bash scripts/make_vllm_env.sh

# ModelOpt reference environment (.venv-modelopt) for the parity test in tests/parity/.
.PHONY: modelopt-env
modelopt-env:
	PYTHON=$(PYTHON) bash scripts/make_modelopt_env.sh
