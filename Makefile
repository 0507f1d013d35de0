# The two commands: `make run` and `make test` (see README.md).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUNTIME ?= $(CURDIR)/run

.PHONY: run test venv proto lint bench clean apt-deps

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	MEMBROKER_RUNTIME_DIR=$(RUNTIME) $(VENV)/bin/membrokerd

apt-deps:
	./deploy/install-test-deps.sh

# The second pass: the revocation suites again with every VA client in cooperative mode (the
# fallback where the kernel lacks sealed mode), which the first pass exercises only in part.
COOPERATIVE_SUITES = tests/integration/test_sharing.py tests/integration/test_verification.py \
	tests/integration/test_sound_revocation.py tests/integration/test_access_guards.py \
	tests/integration/test_vma_budget.py tests/integration/test_revocation_model.py

test: $(STAMP) apt-deps
	$(VPY) -m pytest -rs $(PYTEST_ARGS)
	MEMBROKER_TEST_VA_MODE=cooperative $(VPY) -m pytest -rs $(PYTEST_ARGS) $(COOPERATIVE_SUITES)

proto: $(STAMP)
	$(VPY) proto/generate.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --strict clients/membroker broker/membrokerd

bench: $(STAMP)
	$(VPY) bench/revoke_bench.py

clean:
	rm -rf $(VENV) $(RUNTIME) build *.egg-info
