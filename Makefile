# The two commands of the README, for a fresh machine:
#   make bench   set up .venv, build, run the quick fused-vs-native benchmark
#   make test    set up .venv, build, run the test suite
# Both take the CPU build of torch unless TORCH says otherwise, for example
#   make test TORCH="torch==2.11.0"   (a CUDA build: the extension gets CUDA kernels)
# The build is incremental (setup.py keeps ninja's objects in build/): after
# the first, only changed sources under csrc/ are recompiled.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BENCH_ARGS ?= --quick
PY := $(VENV)/bin/python

.PHONY: setup bench test

# ninja comes from the venv, on PATH for the build: torch's builder finds it
# there, and without it every build is a full, serial one.
setup:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)" ninja
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pip install --quiet --no-build-isolation -e ".[test]"

bench: setup
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# Two workers (pytest-xdist): much of the suite waits on subprocesses
# (ranks, fresh interpreters, compilers), so two keep both cores busy.
test: setup
	$(PY) -m pytest -q -n 2
