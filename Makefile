# The README's two commands: `make quickstart` (set up, then train and sample on the embedded corpus)
# and `make test` (set up, then run the whole test suite). Both create .venv on first use.
#
# Python 3.11 by default: the whole stack also resolves on 3.12, but the CPU build of PyTorch that the
# parity tests and peer benchmarks use is available here only for 3.11 (override: make PYTHON=python3.12).
PYTHON ?= python3.11
VENV := .venv
# Transparent huge pages for glibc malloc: XLA allocates its buffers afresh every step, and without this
# each step page-faults its way through ~1 GB; 1.25x on the tiny train step here (docs/benchmarks.md).
# Read at process start, so it is set for every command make runs; older glibc ignores it.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
PIP := $(VENV)/bin/pip install -q --disable-pip-version-check -c requirements.lock

.PHONY: quickstart test browser prometheus clean

$(VENV)/.core: pyproject.toml requirements.lock
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) -e '.[dev]'
	touch $@

quickstart: $(VENV)/.core
	$(VENV)/bin/python experiments/quickstart.py $(QUICKSTART_FLAGS)

# The browser test drives Debian's Chromium (never a downloaded browser); it is skipped where it cannot
# be installed (not root, no apt).
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	} || echo "chromium could not be installed: the browser test will be skipped"

# The Prometheus tests scrape the API server with Debian's Prometheus and lint /metrics with its
# promtool; they are skipped where the package cannot be installed (not root, no apt).
prometheus:
	@test -x /usr/bin/prometheus -a -x /usr/bin/promtool || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	} || echo "prometheus could not be installed: the Prometheus tests will be skipped"

# Two pytest workers (whole files each, so a file's fixtures are built once): XLA compiles on one core, and
# most of the suite's time is compiling tiny programs, so two files at a time use both cores.
test: $(VENV)/.dev browser prometheus
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --durations=25

clean:
	rm -rf $(VENV) runs .pytest-cache-lmjax
