# memchat: `make demo` runs it, `make test` tests it. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test test-external test-real-model bench lint format clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "memchat needs Python 3.11 or newer: make PYTHON=python3.11 ..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/memchat

test: $(STAMP)
	$(BIN)/ruff check engine tui tests bench
	$(BIN)/ruff format --check engine tui tests bench
	$(BIN)/lint-imports --no-logo
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The engine's database tests against another PostgreSQL (the app and the
# slow process-level suites run once, in `make test`), e.g.
#   make test-external MEMCHAT_TEST_DSN=postgresql://postgres@127.0.0.1:5432/postgres
test-external: $(STAMP)
	@test -n "$(MEMCHAT_TEST_DSN)" || { echo "set MEMCHAT_TEST_DSN"; exit 2; }
	MEMCHAT_TEST_DSN='$(MEMCHAT_TEST_DSN)' $(BIN)/python -m pytest tests/engine -m "db and not slow" $(PYTEST_ARGS)

# memchat against a real small model: llama.cpp's OpenAI-compatible server (in
# .venv-llama/; prebuilt from ../shared/wheels when that folder has the wheel)
# serving SmolLM2-135M (in .cache/real-model/), twice: with and without function
# calling. The tests skip with the reason when either cannot be had. Figures
# (memories per extraction mode, per-turn timings) go to .cache/real-model/summary.json.
# See docs/real-model.md.
test-real-model: $(STAMP)
	-$(BIN)/python -m tests.real_model.harness
	REAL_MODEL_TESTS=1 $(BIN)/python -m pytest tests/real_model -m real_model $(PYTEST_ARGS)

# Every benchmark (a few minutes); BENCH_ARGS="cost --json" for some of them.
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check engine tui tests bench
	$(BIN)/ruff format --check engine tui tests bench
	$(BIN)/lint-imports --no-logo
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format engine tui tests bench
	$(BIN)/ruff check --fix engine tui tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
