# Two commands on a fresh machine: `make serve` and `make test`.
# `make serve PORT=8001 HOST=0.0.0.0 WORKERS=2`: where the API listens and how many workers run
# (unset: CLUSCA_PORT / CLUSCA_HOST, else 127.0.0.1:8000, and one worker).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/clusca: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch from the local wheel cache / PyPI; install a CUDA build yourself on GPU hosts.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: install serve test test-all
install: $(BIN)/clusca

serve: install
	$(BIN)/clusca serve $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT)) $(if $(WORKERS),--workers $(WORKERS))

test: install
	$(BIN)/pytest -q

test-all: install
	$(BIN)/pytest -q -m ''

# Build the CPU image and run the compose stack in a private Docker engine, with faults
# (docker/stack_test.py; needs root, dockerd, debootstrap and docker-compose).
.PHONY: docker-test
docker-test: install
	nice -n 19 $(BIN)/python docker/stack_test.py
