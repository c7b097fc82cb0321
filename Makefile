# Two entry points: `make demo` and `make test`. Both create .venv and install on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
LW := $(VENV)/bin/layerwise
EVAL_TEXT := calib_data/wikitext2-test-excerpt.txt
DEMO_OUT := out/demo-gptq4-b32

.PHONY: install demo test test-fast test-real bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned, so the resolver never pulls a newer (CUDA) build; CPU wheel where offered
	$(VENV)/bin/pip install --quiet "torch==2.13.0"
	$(VENV)/bin/pip install --quiet -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

demo: install
	@echo "== float16 demo model: perplexity on the bundled WikiText-2 test excerpt"
	$(LW) -q ppl models/wt2-llama-4l --data $(EVAL_TEXT) --seqlen 256
	@echo "== GPTQ 4-bit, blocks of 32, 128 x 256-token windows of the bundled calibration excerpt"
	$(LW) -q compress models/wt2-llama-4l --out $(DEMO_OUT) --method gptq --bits 4 --block-size 32 --overwrite
	@echo "== compressed checkpoint: perplexity"
	$(LW) -q ppl $(DEMO_OUT) --data $(EVAL_TEXT) --seqlen 256
	@echo "== size on disk (before, after)"
	@du -b models/wt2-llama-4l/model.safetensors | awk '{printf "float16 weights    %.2f MB\n", $$1/1e6}'
	@cat $(DEMO_OUT)/*.safetensors | wc -c | awk '{printf "compressed weights %.2f MB (embeddings and lm_head stay float16)\n", $$1/1e6}'

# two workers: most tests are Python-bound conversions and small tensors, so each core gets one
# (tests/conftest.py gives each worker, and what it starts, one core's share of GEMM threads)
test: install
	$(VENV)/bin/pytest -q -n 2

test-fast: install
	$(VENV)/bin/pytest -q -n 2 -m "not slow"

# the whole suite plus the real-weights tests, on models built by ../shared/models/*/make.py
test-real: install
	LAYERWISE_GEMMA3_270M=$${LAYERWISE_GEMMA3_270M:-$$HOME/.cache/gemma3-270m} \
	LAYERWISE_SMOLLM2_135M=$${LAYERWISE_SMOLLM2_135M:-$$HOME/.cache/smollm2-135m} \
	$(VENV)/bin/pytest -q -n 2

bench: install
	$(PY) benchmarks/run_bench.py --grid spine

clean:
	rm -rf out $(VENV)
