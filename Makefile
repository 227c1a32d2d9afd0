# Two entry points on a fresh clone: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo-output
EARLY_BIRD ?=
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean-demo venv pyfiles

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	@command -v java >/dev/null || { echo "Java 17 is required for Spark (java not found on PATH)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bigticket demo --out $(DEMO_DIR) $(if $(EARLY_BIRD),--early-bird,)

lint: $(STAMP)
	$(BIN)/ruff check .

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
# Two workers: the suite waits on JVMs, subprocesses and sockets more than it computes (one
# process used 12.5 CPU-minutes in 20.7 wall-minutes); tests/conftest.py keeps the tests that
# share a machine-wide resource in one worker. PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: $(STAMP)
	for b in etl_throughput resample_quality etl_scale train_throughput grid_scaling cluster_sim masked_step compaction_speedup early_bird_saving compression gmp bn_recalibration robustness replicates_demo capacity; do \
	  $(BIN)/python bench/$$b.py || exit 1; done

clean-demo:
	rm -rf $(DEMO_DIR)

# A zip of the packages for `spark-submit --py-files` on clusters where bigticket is not installed.
dist/bigticket-pyfiles.zip: $(shell find common etl train lottery bigticket -name '*.py' 2>/dev/null)
	mkdir -p dist && $(PYTHON) -c "import pathlib, zipfile; z = zipfile.ZipFile('$@', 'w'); \
	  [z.write(p) for d in ('common', 'etl', 'train', 'lottery', 'bigticket') \
	   for p in sorted(pathlib.Path(d).rglob('*')) if p.suffix in ('.py', '.sh')]"

pyfiles: dist/bigticket-pyfiles.zip
