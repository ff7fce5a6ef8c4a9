# q3vl — the two commands a fresh machine needs are `make demo` and `make test`.
# Everything else is for maintainers (oracle, fixtures, benchmarks, the real pipeline).

SHELL := /bin/bash
CARGO ?= cargo
Q3VL := target/release/q3vl
DEMO := target/demo

.PHONY: demo test test-aarch64 test-interop llama-cpp fuzz build fmt clippy oracle lint-oracle fixtures bench bench-convert bench-export bench-gguf bench-serve bench-peer bench-engine bench-ab bench-q8 pipeline clean-demo

## demo: the whole tool on the embedded shapes fixture: fp32 ladder, int8hu conversion,
## quantized gates with a stamp, then the engine answering the fixture's demo images.
demo: build
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	@echo "== 1. fp32 ladder: our reference on fixtures/shapes against the HF oracle traces"
	$(Q3VL) verify --src fixtures/shapes --trace fixtures/shapes/traces/image.safetensors \
	    --trace fixtures/shapes/traces/text.safetensors --report $(DEMO)/fp32-report
	@echo "== 2. convert fixtures/shapes to int8hu bundles"
	$(Q3VL) convert --src fixtures/shapes --out $(DEMO)/bundles --mode int8hu
	@echo "== 3. quantized gates on the bundles; stamp them if every gate passes"
	$(Q3VL) verify --bundle $(DEMO)/bundles --trace fixtures/shapes/traces/image.safetensors \
	    --trace fixtures/shapes/traces/text.safetensors --report $(DEMO)/bundle-report --stamp
	@echo "== 4. the engine answers 'What is in the image?' (true answer in brackets)"
	@n=0; wrong=0; for img in demo_0 demo_1 demo_2 demo_3 demo_4 demo_5; do \
	    n=$$((n + 1)); \
	    want=$$(sed -n "s/.*\"$$img.png\": \"\(.*\)\".*/\1/p" fixtures/shapes/images/answers.json); \
	    got=$$($(Q3VL) run --bundle $(DEMO)/bundles --image fixtures/shapes/images/$$img.png \
	        --prompt "What is in the image?" --max-new-tokens 16 2>/dev/null); \
	    if [ -n "$$want" ] && [ "$$got" = "$$want" ]; then mark=ok; else mark=WRONG; wrong=$$((wrong + 1)); fi; \
	    printf '  %-10s %-36s [%s] %s\n' "$$img" "$$got" "$$want" "$$mark"; \
	done; \
	echo "reports: $(DEMO)/fp32-report/report.html $(DEMO)/bundle-report/report.html"; \
	if [ $$wrong -ne 0 ]; then echo "FAIL: $$wrong of $$n answers wrong"; exit 1; fi; \
	echo "PASS: $$n of $$n answers right"

## test: formatting, lints, rustdoc, and every test (unit, fixtures, end to end).
test: fmt clippy doc
	$(CARGO) test --workspace --all-targets
	$(CARGO) test -p q3vl-kernels --features q8
	$(CARGO) test -p q3vl-engine --features q8-bench --lib bench::q8

## test-aarch64: the kernels' tests (the NEON paths against the portable ones, bit for bit)
## cross-compiled for aarch64 and run under qemu-user. Needs the Debian packages qemu-user,
## gcc-aarch64-linux-gnu and libc6-dev-arm64-cross, and the Rust target aarch64-unknown-linux-gnu.
AARCH64_ENV := CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
test-aarch64:
	$(AARCH64_ENV) $(CARGO) clippy -p q3vl-kernels --target aarch64-unknown-linux-gnu --all-targets -- -D warnings
	$(AARCH64_ENV) $(CARGO) clippy -p q3vl-kernels --features q8 --target aarch64-unknown-linux-gnu --all-targets -- -D warnings
	$(AARCH64_ENV) $(CARGO) test -p q3vl-kernels --target aarch64-unknown-linux-gnu
	$(AARCH64_ENV) $(CARGO) test -p q3vl-kernels --features q8 --target aarch64-unknown-linux-gnu

## fuzz: the mutation fuzz tests of every reader of outside bytes (tests/fuzz.rs) with 100
## times the cases `make test` runs, optimised but with overflow checks and debug assertions
## on (profile `fuzz`). Cases, time and findings go to RELIABILITY.md.
FUZZ_CASES ?= 150000
fuzz:
	Q3VL_FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test --profile fuzz --test fuzz -- --nocapture

fmt:
	$(CARGO) fmt --all --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p q3vl-kernels --features q8 --all-targets -- -D warnings
	$(CARGO) clippy -p q3vl-engine --features q8-bench --all-targets -- -D warnings

## doc: the API docs build without a warning (broken or private intra-doc links).
doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

build:
	$(CARGO) build --release --bin q3vl

## oracle: the pinned Python environment of the fp32 HF oracle (about 5 GB).
# A stamp file, not the interpreter: that is a symlink whose target's age says nothing.
ORACLE_STAMP := oracle/.venv/.q3vl-installed
oracle: $(ORACLE_STAMP)
$(ORACLE_STAMP): oracle/requirements.txt
	python3 -m venv oracle/.venv
	oracle/.venv/bin/pip install -q -r oracle/requirements.txt
	@touch $(ORACLE_STAMP)

## test-interop: the tests that need the oracle's Python or llama.cpp (HF transformers loading
## each fixture's compressed-tensors export, llama.cpp running each GGUF export and its own
## converter compared with it, the oracle's own modes). Without them `make test` skips those
## halves (saying NOT RUN in the test's captured output); this target installs the oracle
## first (about 5 GB) and makes its absence a failure (Q3VL_REQUIRE_ORACLE=1); with
## Q3VL_REQUIRE_LLAMA=1 (CI sets it after `make llama-cpp`) so is llama.cpp's. --workspace: the
## same build as `make test`'s, not a second one with other features.
test-interop: $(ORACLE_STAMP)
	Q3VL_REQUIRE_ORACLE=1 $(CARGO) test --workspace --test export --test export_gguf --test oracle_interop --test serve_clients

## llama-cpp: llama.cpp built once from the source the pinned llama-cpp-python sdist carries,
## into $$Q3VL_PEER_DIR (default /tmp/q3vl-peer) and reused: what bench-peer and the GGUF
## exports' check in test-interop run (about 15 min on 2 cores the first time).
llama-cpp:
	PEER=$${Q3VL_PEER_DIR:-/tmp/q3vl-peer} bash -c 'set -euo pipefail; source scripts/llama-cpp.sh; llama_cpp_setup'

## lint-oracle: ruff (pinned in oracle/lint-requirements.txt) checks and format-checks the
## oracle's Python and scripts/*.py, from a small venv of its own (not the 5 GB oracle one). Not part of `make
## test`, which needs no Python.
LINT_STAMP := oracle/.lint-venv/.q3vl-installed
lint-oracle: $(LINT_STAMP)
	cd oracle && .lint-venv/bin/ruff check . ../scripts && .lint-venv/bin/ruff format --check . ../scripts
$(LINT_STAMP): oracle/lint-requirements.txt
	python3 -m venv oracle/.lint-venv
	oracle/.lint-venv/bin/pip install -q -r oracle/lint-requirements.txt
	@touch $(LINT_STAMP)

## fixtures: rebuild the committed tiny checkpoints and their traces with the oracle.
fixtures: oracle
	bash oracle/make_fixtures.sh

## bench-convert: 8B-shaped conversion speed and memory against the I/O floor.
bench-convert: build
	bash convert/bench/bench-convert.sh

## bench-export: 8B-shaped export to compressed-tensors: wall time against the I/O floor, peak RSS.
bench-export: build
	bash export/bench/bench-export.sh

## bench-gguf: llama.cpp's speed on q3vl's 8B GGUF beside its own Q8_0 conversion (interleaved).
bench-gguf: build
	Q3VL_BIN=$(Q3VL) bash export/bench/bench-gguf-peer.sh

## bench-serve: q3vl serve beside llama.cpp's llama-server (continuous batching on both) on a
## synthetic checkpoint: time to first token for an image prompt, aggregate decode at 1-8 streams.
bench-serve: build
	Q3VL_BIN=$(Q3VL) bash server/bench/bench-serve-peer.sh

## bench-peer: llama.cpp (llama-cpp-python 0.3.36's vendored tree, q8_0) beside q3vl on one synthetic
## 8B checkpoint: prefill, decode, vision, peak RSS (Q3VL_PEER_SIZE=2b|4b; needs `make oracle`).
bench-peer: build
	Q3VL_BIN=$(Q3VL) bash engine/bench/bench-peer.sh

## bench-engine: 8B-shaped engine speed (vision, prefill, decode) against the bandwidth bound.
bench-engine: build
	bash engine/bench/bench-engine.sh

## bench-ab: this checkout's engine against Q3VL_AB_BASE's (default HEAD~1) on one synthetic 8B
## checkpoint: byte-identical bundles, identical tokens, then interleaved prefill/decode/vision rounds.
bench-ab: build
	Q3VL_BIN=$(Q3VL) bash engine/bench/bench-ab.sh
## bench-q8: the int8 × int8 (Q8_0-style) and dequantized f32 kernels, kept for comparison,
## beside the engine's prefill linear on the 8B shape (SHAPES="RxCxT ..." for others).
bench-q8:
	$(CARGO) bench -p q3vl-engine --features q8-bench --bench q8 -- $(SHAPES)

## bench: both benchmarks, on one synthetic 8B checkpoint (Q3VL_BENCH_SRC=DIR reuses one).
bench: build
	@set -e; src=$${Q3VL_BENCH_SRC:-}; own=; \
	if [ -z "$$src" ]; then src=/tmp/q3vl-bench-src; own=1; rm -rf $$src; \
	    $(Q3VL) synth --size 8b --out $$src --seed 0 > /dev/null; fi; \
	trap '[ -n "$$own" ] && rm -rf '"$$src" EXIT; \
	Q3VL_BIN=$(Q3VL) Q3VL_BENCH_SRC=$$src bash convert/bench/bench-convert.sh; \
	Q3VL_BIN=$(Q3VL) Q3VL_BENCH_SRC=$$src bash engine/bench/bench-engine.sh

## pipeline: fetch → convert → oracle trace → verify --stamp → release (see scripts/pipeline.sh).
pipeline: build
	Q3VL=$(Q3VL) bash scripts/pipeline.sh

clean-demo:
	rm -rf $(DEMO)
