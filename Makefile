# The two commands: `make run` and `make test` (see README.md). `make dist` builds the wheel and
# the sdist that installs use (README.md, "Installing").
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
RUNTIME ?= $(CURDIR)/run
DIST ?= $(CURDIR)/dist

# One stamp per set of extras: `run` needs the runtime dependencies only, `test` (and lint,
# proto) the test and lint toolchain too, `dist` the build frontend. Each is an editable install
# of this checkout, so code changes need no reinstall; pyproject.toml changes redo it.
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
DIST_STAMP := $(VENV)/.installed-dist

.PHONY: run test venv dist proto lint bench clean apt-deps

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(RUN_STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

$(DIST_STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e '.[dist]'
	touch $@

venv: $(TEST_STAMP)

run: $(RUN_STAMP)
	MEMBROKER_RUNTIME_DIR=$(RUNTIME) $(VENV)/bin/membrokerd

# dist/membroker-VERSION-py3-none-any.whl and dist/membroker-VERSION.tar.gz (the wheel is built
# from the sdist, so both are known to work). Other files in dist/ (dist/wheels/ for the
# container image) are left alone.
dist: $(DIST_STAMP)
	rm -f $(DIST)/membroker-*.whl $(DIST)/membroker-*.tar.gz
	$(VPY) -m build --outdir $(DIST) .

apt-deps:
	./deploy/install-test-deps.sh

# The second pass: the revocation suites again with every VA client in cooperative mode (the
# fallback where the kernel lacks sealed mode), which the first pass exercises only in part.
COOPERATIVE_SUITES = tests/integration/test_sharing.py tests/integration/test_verification.py \
	tests/integration/test_sound_revocation.py tests/integration/test_access_guards.py \
	tests/integration/test_vma_budget.py tests/integration/test_revocation_model.py

test: $(TEST_STAMP) apt-deps
	$(VPY) -m pytest -rs $(PYTEST_ARGS)
	MEMBROKER_TEST_VA_MODE=cooperative $(VPY) -m pytest -rs $(PYTEST_ARGS) $(COOPERATIVE_SUITES)

proto: $(TEST_STAMP)
	$(VPY) proto/generate.py

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --strict clients/membroker broker/membrokerd

bench: $(RUN_STAMP)
	$(VPY) bench/revoke_bench.py

clean:
	rm -rf $(VENV) $(RUNTIME) $(RUNTIME).state build *.egg-info $(DIST)
