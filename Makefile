# The two quickstart commands (`make demo`, `make test`) create/update .venv as needed.
PYTHON ?= python3
# CPU build on this project's machines; set TORCH=torch (or a CUDA wheel spec) on a GPU box
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast lint protos bench-layer clean chromium

# the first run downloads a few hundred MB: say what it is doing instead of sitting silent
$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(BIN)/python || { echo "==> creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "==> installing into $(VENV): pip, $(TORCH), then moe-swarm with its extras (first run: a few minutes)"
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,hf,sim,api]'
	@touch $(STAMP)
	@echo "==> $(VENV) is ready (activate it with: . $(VENV)/bin/activate)"

demo: $(STAMP)
	$(BIN)/moe-swarm demo

# tests/test_dashboard.py renders the dashboard in headless Chromium (CI: fresh Debian 12, as root)
chromium:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium)

test: $(STAMP) chromium
	$(BIN)/ruff check .
	@# pytest exits 5 when it collects nothing: report it plainly instead of a bare make error
	$(BIN)/python -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is empty" >&2; exit 0; fi; exit $$rc

# the pure-logic subset (tests marked unit: no processes, enforced by tests/conftest.py), < 1 min
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m unit

lint: $(STAMP)
	$(BIN)/ruff check .

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/expert_service.proto

bench-layer: $(STAMP)
	$(BIN)/moe-swarm bench layer --experts 8 --k 2 --hidden 256 --tokens 64 --compare-hivemind --json bench-layer.json

clean:
	rm -rf $(VENV) .cache *.egg-info
