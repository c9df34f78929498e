# meshhook_limits — every target runs the same idempotent set-up first.
.PHONY: all setup demo demo-stop test test-rust test-integration bench bench-slots bench-rate bench-metrics bench-pgboss lint fmt clean

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

## make bench: every benchmark in benches/ (about 12 minutes; a quiet machine)
bench: setup
	bash scripts/install-queue-systems.sh
	bash benches/run.sh
	bash benches/rate.sh
	bash benches/metrics.sh
	bash benches/pgboss.sh

bench-slots: setup
	bash benches/run.sh

bench-rate: setup
	bash benches/rate.sh

bench-metrics: setup
	bash benches/metrics.sh

bench-pgboss: setup
	bash scripts/install-queue-systems.sh
	bash benches/pgboss.sh

lint:
	cargo fmt --check
	cargo clippy --no-default-features --features pg15 -- -D warnings

fmt:
	cargo fmt

clean:
	bash scripts/pg.sh destroy demo || true
	cargo clean
