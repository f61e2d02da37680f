# The two commands of the README: `make run` and `make test`.
.PHONY: run serve web test test-rust test-js test-web lint proto fuzz

WEB_SOURCES := $(shell find web/src web/index.html web/package.json web/vite.config.* proto/index.ts -type f 2>/dev/null)

# The live demo on http://localhost:3000: builds the dashboard if needed, then serves it with a
# demo organisation and a device simulator (SQLite under ./data/, no Redis, no PostgreSQL).
run: web/dist/index.html
	cargo run --release -- demo

# The gateway alone, with the same embedded defaults.
serve: web/dist/index.html
	cargo run --release -- serve

web/dist/index.html: $(WEB_SOURCES) web/package-lock.json
	cd web && npm ci --no-audit --no-fund --loglevel=error && npm run build

# Every test: fmt and clippy, Rust unit and integration tests, the socket.io-client conformance
# suite (SQLite and PostgreSQL, several nodes over Redis), and the dashboard in Chromium.
test: lint test-rust test-js test-web fuzz

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

test-rust:
	cargo test

test-js:
	cargo build
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error && npm test

test-web:
	cargo build
	cd web && npm ci --no-audit --no-fund --loglevel=error && npm test

# The ingest body parser and validator under libFuzzer (cargo-fuzz, nightly) for FUZZ_SECONDS.
# New inputs go to fuzz/corpus/ (not in git); a crash is saved under fuzz/artifacts/ and fails.
FUZZ_SECONDS ?= 60
fuzz:
	mkdir -p fuzz/corpus/ingest_body
	cargo +nightly fuzz run ingest_body fuzz/corpus/ingest_body fuzz/seeds/ingest_body -- \
		-max_total_time=$(FUZZ_SECONDS) -dict=fuzz/ingest.dict

# Regenerate proto/ after changing a type in src/wire.rs.
proto:
	cargo run -- proto

# Performance (README "Performance"). Not part of `make test`: figures, not assertions.
.PHONY: bench-load bench-load-quick bench-micro bench-capacity

# The load harness: builds release binaries, starts its own gateways (SQLite, PostgreSQL, two
# nodes over a private Redis), prints one JSON line per scenario. ARGS="--scenarios fanout" etc.
bench-load:
	bash bench/load.sh $(ARGS)

# The same at small scale, about 2 minutes.
bench-load-quick:
	bash bench/load.sh --quick $(ARGS)

# Criterion micro-benchmarks of validation, batch encoding and the alert state machine.
bench-micro:
	cargo bench --bench hot_paths

# Issue 16's capacity figures (bench/README.md, scenario `capacity`): two nodes on one PostgreSQL
# database and a private Redis (a 3-master Redis Cluster with ARGS=--redis-cluster); Redis and
# node CPU per organisation event, node CPU per delivery, memory per connection. About 2 minutes;
# JSON lines on stdout only, e.g. `make bench-capacity > capacity.jsonl`. Builds the release
# binary unless SENSORWIRE_BIN names one (SENSORWIRE_BIN=/tmp/sensorwire-before).
bench-capacity:
	@if [ -z "$(SENSORWIRE_BIN)" ]; then cargo build --release --bin sensorwire >&2; fi
	@cd bench && { [ -d node_modules ] || npm ci --no-audit --no-fund --loglevel=error >&2; } && \
		node run.mjs --scenarios capacity $(if $(SENSORWIRE_BIN),--bin $(abspath $(SENSORWIRE_BIN))) $(ARGS)
