# Postroom — the two commands a newcomer needs:
#   make run    set up and start Postroom on the embedded default
#   make test   set up and run the whole test suite (pytest + ruff + mypy strict + the docs build)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: venv tools test lint typecheck pytest run clean docs

$(BIN)/postroom: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

venv: $(BIN)/postroom

# Debian packages the tests need, each with the command that shows it is there: docker-compose
# (tests/test_deploy.py validates docker-compose.yml with it; no Docker engine needed), chromium
# (tests/test_dashboard.py drives it with Playwright; Playwright's own browser download is never
# used), postfix and dovecot (tests/support/mailhost.py runs instances of its own on free ports:
# the MTA that bounces and the IMAP mailbox the bounces land in), prometheus for its promtool
# (tests/test_monitoring.py checks and unit-tests config/prometheus/). Installed when root, else
# named. Postfix is installed unconfigured and the packages' own services (prometheus's and the
# node exporter it recommends too) are stopped and disabled right after their install: nothing of
# theirs listens on 25, 143, 993, 9090 or 9100.
TOOLS := docker-compose:docker-compose chromium:chromium postfix:/usr/sbin/postfix \
         dovecot-core:/usr/sbin/dovecot dovecot-imapd:/usr/lib/dovecot/imap dovecot-lmtpd:/usr/lib/dovecot/lmtp \
         prometheus:/usr/bin/promtool

tools:
	@missing=""; \
	for tool in $(TOOLS); do \
	  command -v "$${tool#*:}" >/dev/null 2>&1 || missing="$$missing $${tool%%:*}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's$$missing (the tests need them)"; \
	    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	    for service in postfix dovecot prometheus prometheus-node-exporter; do \
	      case " $$missing " in *" $${service%-node-exporter} "*|*" $$service-core "*) ;; *) continue;; esac; \
	      if [ -d /run/systemd/system ]; then \
	        for unit in $$service.service $$service.socket; do \
	          systemctl disable --now --quiet $$unit 2>/dev/null || true; \
	        done; \
	      else \
	        service $$service stop >/dev/null 2>&1 || true; \
	        update-rc.d $$service disable >/dev/null 2>&1 || true; \
	      fi; \
	    done; \
	  else \
	    echo "note: install Debian's$$missing: test_deploy.py needs docker-compose," \
	      "test_dashboard.py chromium, test_mailhost.py postfix and dovecot, test_monitoring.py promtool" >&2; \
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

# The docs site (mkdocs.yml, docs/) into site/, strict: a broken link or a page outside the nav
# fails. make test builds it too (tests/test_docs.py); `$(BIN)/mkdocs serve` previews it.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

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
	rm -rf $(VENV) var site .mypy_cache .pytest_cache .ruff_cache

# Throughput against baselines run side by side (bench/RESULTS.md); ARGS=--quick for a smoke run.
.PHONY: bench
bench: venv
	$(BIN)/python bench/run.py $(ARGS)

# Fault injection (bench/chaos.py): N messages while workers, Redis and SMTP fail on a schedule.
# ARGS="--n 500 --kills 3" for a short run; the result of a full run is in docs/chaos.md.
.PHONY: chaos chaos-test
chaos: venv
	$(BIN)/python bench/chaos.py --progress $(ARGS)

# The CI-size chaos run as a test (500 messages, 3 kills, a Redis restart); `make test` runs it too.
chaos-test: venv
	$(BIN)/pytest -q -m chaos tests/test_chaos.py

# The compose stack for real (not part of `make test`: it needs root and takes minutes on two
# cores): .ci/docker-standins.sh starts a Docker daemon of its own when none answers (data under
# /tmp/postroom-images), builds stand-ins of the base images from Debian (no image registry
# needed) and postroom:local from this working tree, then runs docker-compose.yml on Redis and
# on RabbitMQ: a message sent and caught, an API key made in the stack and used, /healthz,
# /metrics, Prometheus scraping it; `down -v` after each (and on failure). Host ports:
# POSTROOM_HTTP_PORT, POSTROOM_METRICS_PORT, POSTROOM_PROMETHEUS_PORT, POSTROOM_FLOWER_PORT
# (18425, 19464, 19090, 15555 here: no clash with a `postroom up`);
# SKIP_RABBITMQ=1 runs the Redis stack only; REBUILD=1 rebuilds the stand-ins.
.PHONY: compose-test
compose-test:
	bash .ci/docker-standins.sh test
