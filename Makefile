# meshhook_limits — every target runs the same idempotent set-up first.
.PHONY: all setup demo demo-stop test test-rust test-integration bench lint fmt clean

all: demo

setup:
	bash scripts/setup.sh

## make demo: install what is missing, build, start a local server, load a demo
demo: setup
	bash scripts/demo.sh

demo-stop:
	bash scripts/pg.sh stop demo

## make test: the same set-up, then every test (pgrx unit tests + integration tests)
test:
	bash scripts/setup.sh --test
	bash scripts/test.sh

test-rust:
	bash scripts/setup.sh --test
	bash scripts/test.sh rust

test-integration:
	bash scripts/setup.sh --test
	bash scripts/test.sh integration

bench: setup
	bash benches/run.sh

lint:
	cargo fmt --check
	cargo clippy --no-default-features --features pg15 -- -D warnings

fmt:
	cargo fmt

clean:
	bash scripts/pg.sh destroy demo || true
	cargo clean
