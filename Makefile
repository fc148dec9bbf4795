# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the default suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-video test test-slow test-all clean

$(VENV)/.installed: requirements.txt setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m dgpo_lightning.demo

# DGPO on the embedded video world (open question 1 at toy scale); outputs in runs/demo_video/.
demo-video: $(VENV)/.installed
	$(PY) -m dgpo_lightning.demo --config experiments/base/world_video_demo.yaml --out runs/demo_video

test: $(VENV)/.installed
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m "slow and not gpu" -q

test-all: $(VENV)/.installed
	$(PY) -m pytest -m "not gpu" -q

clean:
	rm -rf $(VENV) runs .pytest_cache
