# longvid: the two commands of the README's quick start, plus helpers.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh

install: $(VENV)/.installed

## Generate a short MP4 with the built-in random-weight demo model (seconds on a CPU).
demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/longvid generate --recipe demo --out outputs/ --overwrite

## Run the whole test suite: two worker processes (the tests run one CPU thread each; work-stealing keeps
## the long subprocess tests from queueing behind one another). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

## CPU benchmarks (minutes); numbers go to docs/benchmarks.md.
bench: $(VENV)/.installed
	$(BIN)/python scripts/bench/freenoise.py
	$(BIN)/python scripts/bench/freelong.py
	$(BIN)/python scripts/bench/engine.py
	$(BIN)/python scripts/bench/freeloc.py
	$(BIN)/python scripts/bench/freeswim.py --cpu-time
	$(BIN)/python scripts/bench/pyramid_flow.py --cpu-time
	$(BIN)/python scripts/bench/batch.py
	$(BIN)/python scripts/bench/metrics.py

clean:
	rm -rf outputs build *.egg-info
