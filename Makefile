# Postroom — the two commands a newcomer needs:
#   make run    set up and start Postroom on the embedded default
#   make test   set up and run the whole test suite (pytest + ruff + mypy strict)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: venv tools test lint typecheck pytest run clean

$(BIN)/postroom: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

venv: $(BIN)/postroom

# Debian packages the tests need: docker-compose (tests/test_deploy.py validates docker-compose.yml
# with it; no Docker engine needed) and chromium (tests/test_dashboard.py drives it with Playwright;
# Playwright's own browser download is never used). Installed when root, else named.
tools:
	@missing=""; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's$$missing (the tests need them)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "note: install Debian's$$missing: test_deploy.py needs docker-compose, test_dashboard.py chromium" >&2; \
	  fi; \
	fi

pytest: venv tools
	$(BIN)/pytest -q

LINTED := worker tests $(wildcard bench)

lint: venv
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

typecheck: venv
	$(BIN)/mypy

test: lint typecheck pytest

run: venv
	$(BIN)/postroom up

# Refresh constraints.txt: the newest versions pyproject.toml allows, installed in a scratch venv
# and frozen (then run make test, and commit both).
.PHONY: lock
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --disable-pip-version-check '.[dev]'
	{ sed -n '1,/^# Refresh/p' constraints.txt; \
	  .lock-venv/bin/pip freeze --exclude-editable --disable-pip-version-check | grep -v '^postroom'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf $(VENV) var .mypy_cache .pytest_cache .ruff_cache

# Throughput against baselines run side by side (bench/RESULTS.md); ARGS=--quick for a smoke run.
.PHONY: bench
bench: venv
	$(BIN)/python bench/run.py $(ARGS)

# Fault injection (bench/chaos.py): N messages while workers, Redis and SMTP fail on a schedule.
# ARGS="--n 500 --kills 3" for a short run; the result of a full run is in the README.
.PHONY: chaos chaos-test
chaos: venv
	$(BIN)/python bench/chaos.py --progress $(ARGS)

# The CI-size chaos run as a test (500 messages, 3 kills, a Redis restart); `make test` runs it too.
chaos-test: venv
	$(BIN)/pytest -q -m chaos tests/test_chaos.py
