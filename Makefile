# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export OMP_NUM_THREADS ?= 2
export MPLBACKEND := Agg
# The browser tests install Debian's chromium when it is missing (as root only; they skip otherwise).
export BBDECODER_INSTALL_CHROMIUM ?= 1
.DEFAULT_GOAL := test

# A separate venv for side-by-side benchmarks against peers that need torchvision
# (pytorch-grad-cam). Never used by `make test`.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp
$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BENCH_VENV)/bin/python -m pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench-venv: $(BENCH_STAMP)

.PHONY: venv test test-slow test-all demo lint bench bench-venv clean docs system-tools

# Debian's graphviz (architecture pictures) and ffmpeg (feature-evolution MP4s), so that `make test`
# runs those paths too: installed only when missing, and only as root with apt-get (CI); quiet, and
# idempotent. Without them the tests of the fallbacks still run and the tools' tests skip.
system-tools:
	@if ! command -v dot >/dev/null 2>&1 || ! command -v ffmpeg >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing graphviz and ffmpeg with apt-get"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends graphviz ffmpeg) >/dev/null 2>&1 \
	      || echo "apt-get could not install graphviz/ffmpeg: their tests will skip"; \
	  else \
	    echo "graphviz/ffmpeg missing (not root): their tests will skip; apt-get install graphviz ffmpeg"; \
	  fi; \
	fi

$(STAMP): pyproject.toml setup.py $(wildcard src/bbdecoder/monitor/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch from local disk first, so that nothing pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,tensorflow,lightning]'
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP) system-tools
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

test-all: $(STAMP) system-tools
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/bbdecoder demo --out runs/demo
	$(VENV)/bin/bbdecoder demo --text --out runs/demo-text

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples tools
	$(VENV)/bin/mypy

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python bench/run_all.py

# The documentation site, from docs/ and the docstrings, into site/ (offline; warnings are errors).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs site .pytest_cache .mypy_cache .ruff_cache

