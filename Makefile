# ambient-testbed: everything a user needs on a fresh Debian 12 VM, as root.
VENV := .venv
PY := $(VENV)/bin/python
TESTBED := $(VENV)/bin/testbed
EXPERIMENT ?= experiments/default.yaml

.PHONY: setup python-env test unit integration experiment bench report lint fuzz chaos soak clean

setup:
	@bash scripts/setup.sh

python-env:
	@bash scripts/setup.sh python

test: setup
	$(PY) -m pytest -q tests

unit: setup
	$(PY) -m pytest -q tests/unit

integration: setup
	$(PY) -m pytest -q tests/integration

experiment: setup
	$(TESTBED) run $(EXPERIMENT) --report

# make bench [QUICK=1] [BENCH_ARGS="--modes inpod,sidecar --pinning split"]
bench: setup
	$(TESTBED) bench $(if $(QUICK),--quick,) $(BENCH_ARGS)

report: setup
	$(TESTBED) report $(RUN)

lint: python-env
	$(VENV)/bin/ruff check testbed tests topologies scripts
	$(VENV)/bin/ruff format --check testbed tests topologies scripts
	$(VENV)/bin/mypy testbed tests scripts

# Every fuzz target for FUZZ_INPUTS inputs (default 100,000), each at most FUZZ_SECONDS;
# new seeds land in tests/fuzz/corpus/. atheris is optional: without it, hypothesis runs all.
fuzz: setup
	$(PY) -m pip install -q -e '.[fuzz]' || echo "atheris did not install: hypothesis only"
	$(PY) tests/fuzz/run.py $(TARGETS)

# Faults under load, the long version: DURATION seconds per mode (default 120) over MODES
# (default inpod,legacy,ebpf); prints the summary, writes results/chaos/summary.json.
chaos: setup
	$(PY) scripts/chaos.py $(if $(DURATION),--duration $(DURATION),) $(if $(MODES),--modes $(MODES),)

# make soak [DURATION=10m] [MODE=inpod]: mixed traffic + policy changes; exit 1 on a leak
soak: setup
	$(TESTBED) soak --duration $(or $(DURATION),10m) $(if $(MODE),--mode $(MODE),)

clean: setup
	$(TESTBED) clean --all
