# xenpbr: every target installs what it needs (Debian 12, as root).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST := $(BIN)/python -m pytest
# make test runs its tests in this many pytest-xdist workers, each a whole test file at a
# time and each with its own QEMU + Xen (one lab host keeps about one of 2 cores busy)
TEST_WORKERS ?= 2

.PHONY: help deps venv lab test test-fast test-lab test-long test-debian demo bench consistency resurrect faults deb clean

help:
	@echo "make demo       build the lab, boot real Xen in QEMU, crash a guest, show its recovery"
	@echo "                (DEMO_ARGS='--cpu-hog 6' runs it beside 6 busy processes: a loaded machine)"
	@echo "make test       fast suite + real-Xen lab suite (without the tests marked long),"
	@echo "                in TEST_WORKERS=2 workers, each booting its own Xen"
	@echo "make test-long  the lab tests too long for every CI run (tests marked long)"
	@echo "make test-fast  unit tests only (no QEMU)"
	@echo "make test-lab   real-Xen lab tests only"
	@echo "make test-debian  the lab tests on a Debian 12 dom0 with systemd and the xenpbr .deb,"
	@echo "                and a Debian 12 guest with the xenpbr-agent .deb, PostgreSQL and auditd"
	@echo "make lab        build (or reuse) the lab's boot artefacts"
	@echo "make bench      normal vs phase-based vs xl-restore recovery, into docs/benchmarks/"
	@echo "                (busybox guests at 128-512 MiB and a Debian 12 guest with PostgreSQL;"
	@echo "                BENCH_ARGS='--workloads debian --merge' re-measures the Debian row alone)"
	@echo "                (BENCH_ARGS='--workloads bare --memory 128 --repeats 3' for a quick run)"
	@echo "make consistency  20 crash/phase-reboot cycles of a guest with a snapshot root disk"
	@echo "                and a persistent data disk: build/consistency-report.json"
	@echo "make resurrect  20 crashes of a key-value application's guest with resurrection, beside"
	@echo "                phase-based reboot alone and a normal reboot: build/resurrection-report.json"
	@echo "                (RESURRECT_ARGS='--cycles 3' for a quick run)"
	@echo "make faults    a fault campaign: 200 faults injected into a guest kernel from dom0"
	@echo "                (stack, text, operand, hang, crash), each classified and recovered,"
	@echo "                merged into docs/faults/report.json and .md (FAULTS_ARGS='--count 20')"
	@echo "make deb        Debian packages xenpbr (dom0) and xenpbr-agent (guests) into build/deb/,"
	@echo "                checked by lintian (installs debhelper, dh-python, lintian)"

deps:
	tools/install-host-deps.sh
	tools/install-host-deps.sh --deb
	tools/install-host-deps.sh --debian

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench,faults]'
	touch $@

venv: $(BIN)/.installed

lab: deps venv
	$(BIN)/xenpbr-lab build

test: lab
	$(PYTEST) -m "not long" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
	    --durations=40

test-long: deps venv
	$(PYTEST) -m long

test-fast: venv
	$(PYTEST) -m "not lab"

test-lab: deps venv
	$(PYTEST) -m "lab and not long"

test-debian: deps venv
	$(PYTEST) -m debian

demo: deps venv
	$(BIN)/xenpbr-lab demo $(DEMO_ARGS)

bench: deps venv
	$(BIN)/xenpbr-lab bench $(BENCH_ARGS)

consistency: deps venv
	$(BIN)/xenpbr-lab consistency $(CONSISTENCY_ARGS)

resurrect: deps venv
	$(BIN)/xenpbr-lab resurrect $(RESURRECT_ARGS)

faults: deps venv
	$(BIN)/xenpbr-lab faults $(FAULTS_ARGS)

deb:
	tools/install-host-deps.sh --deb
	tools/build-deb.sh

clean:
	rm -rf $(VENV) build lab-artifacts *.egg-info
