# q3vl — the two commands a fresh machine needs are `make demo` and `make test`.
# Everything else is for maintainers (oracle, fixtures, benchmarks, the real pipeline).

SHELL := /bin/bash
CARGO ?= cargo
Q3VL := target/release/q3vl
DEMO := target/demo
PY := oracle/.venv/bin/python

.PHONY: demo test build fmt clippy oracle fixtures bench bench-convert pipeline clean-demo

## demo: convert the embedded shapes fixture to int8hu, verify it, and show the reports.
demo: build
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	@echo "== fp32 ladder: our reference on fixtures/shapes vs the HF oracle"
	$(Q3VL) verify --src fixtures/shapes --trace fixtures/shapes/traces/image.safetensors \
	    --trace fixtures/shapes/traces/text.safetensors --report $(DEMO)/fp32-report
	@echo "== convert fixtures/shapes -> int8hu bundles"
	$(Q3VL) convert --src fixtures/shapes --out $(DEMO)/bundles --mode int8hu
	@echo "== inspect the language bundle"
	$(Q3VL) inspect $(DEMO)/bundles/shapes_decode_int8hu

## test: formatting, lints, and every test (unit, fixtures, end to end).
test: fmt clippy
	$(CARGO) test --workspace --all-targets

fmt:
	$(CARGO) fmt --all --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

build:
	$(CARGO) build --release --bin q3vl

## oracle: the pinned Python environment of the fp32 HF oracle (about 5 GB).
oracle: $(PY)
$(PY): oracle/requirements.txt
	python3 -m venv oracle/.venv
	oracle/.venv/bin/pip install -q -r oracle/requirements.txt
	@touch $(PY)

## fixtures: rebuild the committed tiny checkpoints and their traces with the oracle.
fixtures: oracle
	bash oracle/make_fixtures.sh

## bench-convert: 8B-shaped conversion speed and memory against the I/O floor.
bench-convert: build
	bash convert/bench/bench-convert.sh

bench: bench-convert

## pipeline: fetch → convert → oracle trace → verify --stamp → release (see scripts/pipeline.sh).
pipeline: build
	Q3VL=$(Q3VL) bash scripts/pipeline.sh

clean-demo:
	rm -rf $(DEMO)
