# One entry point for the checks, used by developers and by CI (.ci/run runs the same steps).
#   make check   everything: lint, then test
#   make lint    cargo fmt and clippy, ruff, mypy --strict, stubtest against the built module
#   make test    the Rust tests, then the Python tests against the module built in .venv
#   make develop the .venv with the pinned tools and phi3 built into it (release)

VENV := .venv
PY := $(VENV)/bin/python
PY_SOURCES := python tests benchmarks

.PHONY: check lint test develop lint-rust lint-python stubtest test-rust test-python

check: lint test

lint: lint-rust lint-python stubtest

test: test-rust test-python

$(VENV)/.tools: requirements-dev.txt requirements-ray.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet "ray[serve,data]" -c requirements-ray.txt
	touch $@

develop: $(VENV)/.tools
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release --quiet

lint-rust:
	cargo fmt --check
	cargo clippy --all-targets --features python -- -D warnings
	cargo clippy --features fuzzing -- -D warnings

lint-python: $(VENV)/.tools
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)
	$(PY) -m mypy python/

stubtest: develop
	$(PY) -m mypy.stubtest phi3._core --allowlist stubtest-allowlist.txt

test-rust:
	cargo test --release

test-python: develop
	$(PY) -m pytest -q
