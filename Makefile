# The two commands of the README. Each does its own set-up; `cargo` fetches the crates.

STEPS := 1-no-policy 2-default-deny 3-allow-from-cluster-1
EXAMPLE := examples/two-cluster

.PHONY: demo offline test bench bench-dataplane

## demo: the main job — the seed's two-cluster demo, live: network namespaces, the tracker, a
## CA per cluster, `weft node` per node and real TCP through them (needs root, ip and nft).
demo:
	cargo build --quiet --bin weft
	@if [ "$$(id -u)" = 0 ]; then target/debug/weft demo; else sudo target/debug/weft demo; fi

## offline: the same example without traffic — `weft policy check` on its three steps.
offline:
	cargo build --quiet --bin weft
	@for step in $(STEPS); do \
		echo "== $$step"; \
		target/debug/weft policy check --clusters $(EXAMPLE)/$$step --probes $(EXAMPLE)/probes.yaml || exit 1; \
	done

## test: the whole test suite (what CI runs after fmt and clippy).
test:
	cargo test --locked --no-fail-fast --lib --bins --tests

## bench: the policy engine benchmark (figures and their baselines).
bench:
	cargo bench --locked --bench policy

## bench-dataplane: weft's data plane against direct TCP in a network-namespace lab (as root).
bench-dataplane:
	cargo build --locked --profile dist --bin weft
	WEFT_BIN=target/dist/weft cargo bench --locked --bench dataplane
