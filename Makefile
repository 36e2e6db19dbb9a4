# Two entry points on a fresh machine: `make serve` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

VENV    ?= .venv
PYTHON  ?= python3
STUDIES ?= ./studies
PORT    ?= 8000
HOST    ?= 0.0.0.0
# CONF: space-separated key=value pairs, e.g. CONF="preset=vista3d weights=/models/model_vista3d.pt"
CONF    ?=

BIN := $(VENV)/bin
CONF_ARGS := $(foreach kv,$(CONF),--conf $(word 1,$(subst =, ,$(kv))) $(patsubst $(word 1,$(subst =, ,$(kv)))=%,%,$(kv)))
# pip warns once per package about local index folders that do not exist on every machine.
PIP_QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: venv serve test lint unit e2e clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt 2>&1 | $(PIP_QUIET)
	touch $@

serve: venv
	@case "$(STUDIES)" in http://*|https://*) ;; *) mkdir -p "$(STUDIES)";; esac
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/monailabel start_server --app apps/vista3d \
		--studies "$(STUDIES)" --host $(HOST) --port $(PORT) $(CONF_ARGS)

lint: venv
	$(BIN)/ruff check apps tests bench tools
	$(BIN)/ruff format --check apps tests bench tools
	$(BIN)/mypy apps/vista3d/lib apps/vista3d/main.py

test: lint
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not e2e" -ra

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
