# rewardkit: two commands on a fresh machine.
#   make demo   creates .venv, installs, runs the whole loop on the embedded default
#   make test   same environment plus dev tools, runs the tests
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: a CPU build from a local wheel here; an unpinned torch (asked for
# by any later package) would resolve to a multi-GB CUDA build.
TORCH := torch==2.13.0
DEMO_OUT ?= demo_out

.PHONY: demo test bench lint format clean browser

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

# The tests exercise the Spark and Ray engines too (Java 17+ needed: checked here in one line).
$(VENV)/.installed-dev: $(VENV)/.installed
	@java -version >/dev/null 2>&1 || { echo "make test: Java 17+ is needed for the Spark tests (Debian: apt-get install -y openjdk-17-jre-headless)"; exit 2; }
	$(BIN)/pip install -q -e '.[dev,spark,ray,serve]'
	touch $@

# The review page test drives headless Chromium (Debian packages; Playwright's download is
# not used). Installed here when missing and root; otherwise that one test is skipped.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q chromium chromium-driver; \
	else echo "make test: headless Chromium missing (sudo apt-get install -y chromium chromium-driver); the review page test will be skipped"; fi

demo: $(VENV)/.installed
	$(BIN)/rewardkit demo --out $(DEMO_OUT)

test: $(VENV)/.installed-dev browser
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_render.py
	$(BIN)/python benchmarks/bench_oracle_agreement.py
	$(BIN)/python benchmarks/bench_community.py
	$(BIN)/python benchmarks/bench_recurrent.py --n 32
	$(BIN)/python benchmarks/bench_hostile_images.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(VENV)/.installed-dev
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
