# The two commands of the README's quick start: `make run` and `make test`.
# Both create .venv when it is missing and reinstall when pyproject.toml changed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STAMP_TEST := $(VENV)/.installed-test

.PHONY: run test check lint bench clean tools

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "perpflow needs Python 3.11 ($(PYTHON) not found); set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	@touch $@

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	@touch $@ $(STAMP)

# The main job on the embedded default (broker + store in-process): replay the older part of the bundled
# real sample into the archive, label, train and promote, then trade the most recent days through the
# live chain and the paper exchange, and print what happened.
run: $(STAMP)
	$(BIN)/perpflow demo --data data/binance-um-futures --symbols BTCUSDT,ETHUSDT,1000PEPEUSDT

# The deployment checks run real tools, installed here when missing: promtool and Prometheus (Debian's
# prometheus package), Alertmanager and amtool (prometheus-alertmanager) and docker-compose v1 (Debian's;
# `config` needs no engine). kubectl (for kustomize)
# comes with the machine image.
DEB_TOOLS := promtool:prometheus prometheus:prometheus docker-compose:docker-compose \
	prometheus-alertmanager:prometheus-alertmanager amtool:prometheus-alertmanager
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

tools:
	@missing=$$(for t in $(DEB_TOOLS); do command -v $${t%%:*} >/dev/null || echo $${t#*:}; done | sort -u); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		{ $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
			--no-install-recommends $$missing; } || echo "WARNING: could not install $$missing; the tests that need them skip"; \
	fi

test: $(STAMP_TEST) tools
	$(BIN)/ruff check streams schemas connectors training tests benchmarks grafana deploy
	$(BIN)/python -m pytest

# For iterating: lint, then the tests that start no broker, store or process (the math, codecs, the guard and the
# paper engine, labels and training, the deployment files), in well under a minute. `make test` runs everything.
UNIT_TESTS := codec docs event_order history_files input_offsets labels model_age paper_engine policy_ev \
	replay_back_pressure risk_guard training indicators calibration k8s compose prometheus
check: $(STAMP_TEST) tools
	$(BIN)/ruff check streams schemas connectors training tests benchmarks grafana deploy
	$(BIN)/python -m pytest -q $(UNIT_TESTS:%=tests/test_%.py)

bench: $(STAMP_TEST)
	$(BIN)/python -m benchmarks

clean:
	rm -rf var .pytest_cache
