# The two commands of the README: `make run` and `make test`.
.PHONY: run test test-rust test-js lint proto

# Serve on http://localhost:3000 with the embedded defaults (SQLite under ./data/, no Redis).
run:
	cargo run --release -- serve

# Every test: Rust unit and integration tests, then the socket.io-client conformance suite,
# each against SQLite and PostgreSQL.
test: lint test-rust test-js

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

test-rust:
	cargo test

test-js:
	cargo build
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error && npm test

# Regenerate proto/ after changing a type in src/wire.rs.
proto:
	cargo run -- proto
