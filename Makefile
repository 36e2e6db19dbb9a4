# Two entry points on a fresh machine: `make serve` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

VENV    ?= .venv
PYTHON  ?= python3
STUDIES ?= ./studies
PORT    ?= 8000
# Loopback unless HOST is given; on any other address the server needs users (tools/users.py) or CONF=auth=off.
HOST    ?= 127.0.0.1
# CONF: space-separated key=value pairs, e.g. CONF="preset=vista3d weights=/models/model_vista3d.pt"
CONF    ?=

BIN := $(VENV)/bin
CONF_ARGS := $(foreach kv,$(CONF),--conf $(word 1,$(subst =, ,$(kv))) $(patsubst $(word 1,$(subst =, ,$(kv)))=%,%,$(kv)))
# pip warns once per package about local index folders that do not exist on every machine.
PIP_QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

# Orthanc (scripts/orthanc/): loopback DICOMweb server for `make serve STUDIES=$(ORTHANC_URL)` and the tests.
ORTHANC_PORT ?= 8042
ORTHANC_URL  := http://127.0.0.1:$(ORTHANC_PORT)/dicom-web
ORTHANC_ENV  := ORTHANC_PORT=$(ORTHANC_PORT)
# System packages (Debian) the DICOMweb and browser tests need; installed only when missing.
APT_GET := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get
apt_install = $(APT_GET) update -qq && $(APT_GET) install -y -qq $(1)

.PHONY: venv serve test lint unit e2e clean orthanc orthanc-install orthanc-stop browser-install supervoxels

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt 2>&1 | $(PIP_QUIET)
	touch $@

serve: venv
	@case "$(STUDIES)" in http://*|https://*) ;; *) mkdir -p "$(STUDIES)";; esac
	PATH="$(abspath $(BIN)):$$PATH" PYTHONPATH="$(abspath apps/vista3d)" $(BIN)/monailabel start_server \
		--app apps/vista3d --studies "$(STUDIES)" --host $(HOST) --port $(PORT) \
		--uvicorn_app lib.server.asgi:app $(CONF_ARGS)

lint: venv
	$(BIN)/ruff check apps tests bench tools scripts
	$(BIN)/ruff format --check apps tests bench tools scripts
	$(BIN)/mypy apps/vista3d/lib apps/vista3d/main.py

# The whole suite, browser tests included; `pytest -m "not e2e"` skips the browser for quick runs.
test: lint orthanc-install browser-install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -ra --durations=25

e2e: venv orthanc-install browser-install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m e2e -ra

orthanc-install:
	@if ! command -v Orthanc >/dev/null || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then \
		$(call apt_install,orthanc orthanc-dicomweb); fi

browser-install:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		$(call apt_install,chromium chromium-driver); fi

# Starts the project's Orthanc (storage in .orthanc/) and uploads ../shared/data's DICOM series.
# Supervoxels for the datastore's images (low-level; SAM with SAM=<checkpoint> [SAM_MODEL=vit_b]).
supervoxels: venv
	$(BIN)/python tools/supervoxels.py --studies $(STUDIES) $(if $(SAM),--sam-checkpoint $(SAM) --sam-model $(or $(SAM_MODEL),vit_b))

orthanc: venv orthanc-install
	$(ORTHANC_ENV) scripts/orthanc/orthanc.sh start
	$(BIN)/python scripts/orthanc/upload.py --orthanc http://127.0.0.1:$(ORTHANC_PORT)

orthanc-stop:
	$(ORTHANC_ENV) scripts/orthanc/orthanc.sh stop

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
