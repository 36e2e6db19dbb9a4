# Two entry points on a fresh machine: `make serve` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

VENV    ?= .venv
PYTHON  ?= python3
# Empty: the project's own Orthanc (storage in ORTHANC_HOME); or a local folder, or a DICOMweb URL.
STUDIES ?=
PORT    ?= 8000
# Loopback unless HOST is given; on any other address the server needs users (tools/users.py) or CONF=auth=off.
HOST    ?= 127.0.0.1
# CONF: space-separated key=value pairs, e.g. CONF="preset=vista3d weights=/models/model_vista3d.pt"
CONF    ?=
# REPLICAS: servers behind one HAProxy on HOST:PORT, on loopback ports PORT+1..PORT+N (docs/replicas.md).
REPLICAS ?= 1

BIN := $(VENV)/bin
CONF_ARGS := $(foreach kv,$(CONF),--conf $(word 1,$(subst =, ,$(kv))) $(patsubst $(word 1,$(subst =, ,$(kv)))=%,%,$(kv)))
# pip warns once per package about local index folders that do not exist on every machine.
PIP_QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

# The project's Orthanc (tools/orthanc.py): the loopback DICOMweb datastore `make serve` starts without STUDIES.
ORTHANC_PORT ?= 8042
ORTHANC_HOME ?= .orthanc
DATASTORE    := $(or $(STUDIES),http://127.0.0.1:$(ORTHANC_PORT)/dicom-web)
# The user store the server reads: CONF's users=<path>, else the datastore's default (tools/users.py).
USERS_CONF   := $(patsubst users=%,%,$(filter users=%,$(CONF)))
# System packages (Debian) the DICOMweb and browser tests need; installed only when missing.
APT_GET := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get
apt_install = $(APT_GET) update -qq && $(APT_GET) install -y -qq $(1)

.PHONY: venv serve add user test lint unit e2e clean orthanc-install browser-install haproxy-install postgres-install supervoxels

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt 2>&1 | $(PIP_QUIET)
	touch $@

# Serves until Ctrl-C; without STUDIES on the project's Orthanc, which it starts and stops.
serve: venv $(if $(STUDIES),,orthanc-install) $(if $(filter-out 1,$(REPLICAS)),haproxy-install)
	$(BIN)/python tools/serve.py $(if $(STUDIES),--studies "$(STUDIES)") --host $(HOST) --port $(PORT) \
		--orthanc-port $(ORTHANC_PORT) --orthanc-home "$(ORTHANC_HOME)" --replicas $(REPLICAS) $(CONF_ARGS)

# Adds a CT to the serving datastore: STUDY=<NIfTI CT, DICOM folder, DICOM zip> (several: space-separated).
add: venv
	@test -n "$(STUDY)" || { echo "usage: make add STUDY=<NIfTI CT, DICOM folder or zip> [STUDIES=...]" >&2; exit 2; }
	$(BIN)/python tools/add_study.py $(STUDY) --studies "$(DATASTORE)" --viewer http://127.0.0.1:$(PORT)

# Adds a user (password read from the terminal); the first user turns sign-in on. ROLE: user, annotator, reviewer, admin.
user: venv
	@test -n "$(NAME)" || { echo "usage: make user NAME=<name> [ROLE=annotator] [STUDIES=...]" >&2; exit 2; }
	$(BIN)/python tools/users.py $(if $(USERS_CONF),--users "$(USERS_CONF)",--studies "$(DATASTORE)") \
		add "$(NAME)" --role $(or $(ROLE),annotator)

lint: venv
	$(BIN)/ruff check apps tests bench tools
	$(BIN)/ruff format --check apps tests bench tools
	$(BIN)/mypy apps/vista3d/lib apps/vista3d/main.py
	MYPYPATH=apps/vista3d $(BIN)/mypy tools/serve.py tools/add_study.py tools/orthanc.py tools/haproxy.py tools/replicas.py

# The whole suite, browser tests included; `pytest -m "not e2e"` skips the browser for quick runs.
test: lint orthanc-install browser-install haproxy-install postgres-install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -ra --durations=25

e2e: venv orthanc-install browser-install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m e2e -ra

orthanc-install:
	@if ! command -v Orthanc >/dev/null || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then \
		$(call apt_install,orthanc orthanc-dicomweb); fi

# The state store's PostgreSQL backend is tested on a throw-away server (tests/postgres.py: initdb + postgres).
postgres-install:
	@if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then $(call apt_install,postgresql); fi

haproxy-install:
	@if ! command -v haproxy >/dev/null; then $(call apt_install,haproxy); fi

browser-install:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		$(call apt_install,chromium chromium-driver); fi

# Supervoxels for a local folder datastore's images (low-level; SAM with SAM=<checkpoint> [SAM_MODEL=vit_b]).
supervoxels: venv
	@test -n "$(STUDIES)" || { echo "usage: make supervoxels STUDIES=<folder> (a local folder datastore)" >&2; exit 2; }
	$(BIN)/python tools/supervoxels.py --studies "$(STUDIES)" $(if $(SAM),--sam-checkpoint $(SAM) --sam-model $(or $(SAM_MODEL),vit_b))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
