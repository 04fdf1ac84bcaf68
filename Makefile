# make demo: a DP-FedAvg run on the embedded digits task.
# make test: the whole test suite.
# make bench: round time, memory and compute floor -> BENCHMARKS.md.
# make gpu-check: the in-process engine on a GPU (placement, GPU vs CPU).
# Both create .venv (python3.11) and install the locked versions first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
INSTALLED := $(VENV)/.installed-stamp
LOCK := requirements/lock.txt

.PHONY: install demo test bench gpu-check lock clean

install: $(INSTALLED)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(UV): | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# The lock is complete and carries the jax/jaxlib override, so it is installed
# as it is, not re-resolved (TFF still asks for jax 0.4.14; see BUILD.md).
# Compiled to bytecode once: where PYTHONDONTWRITEBYTECODE is set, every
# process would otherwise compile TensorFlow and TFF again (15 s to import
# TFF instead of 5).
$(INSTALLED): $(LOCK) setup.cfg pyproject.toml Makefile | $(UV)
	$(UV) pip install --python $(PY) --no-deps --compile-bytecode -r $(LOCK)
	$(UV) pip install --python $(PY) --no-deps -e .
	touch $@

demo: $(INSTALLED)
	$(PY) -m experiments.train --output_dir=runs/demo --overwrite

# One pytest worker per core, at most 4 (each imports TensorFlow and TFF);
# a test class stays on one worker, so its shared setup runs once.
test: $(INSTALLED)
	$(PY) -m pytest -n auto --maxprocesses=4 --dist=loadscope

bench: $(INSTALLED)
	$(PY) -m benchmarks.run --output=BENCHMARKS.md --json=benchmarks/results.json --repeats=5

# Re-resolves every version; see BUILD.md before committing a new lock.
lock: | $(UV)
	$(UV) pip compile setup.cfg --extra test \
	  --override requirements/overrides.txt \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_31 \
	  -o $(LOCK)

clean:
	rm -rf $(VENV) runs *.egg-info

# The in-process engine on a GPU: CUDA libraries for TensorFlow 2.14, then
# placement and a FEMNIST round, GPU against CPU (benchmarks/gpu_check.py).
gpu-check: $(INSTALLED)
	$(UV) pip install --python $(PY) -r requirements/cuda.txt
	$(PY) -m benchmarks.gpu_check
