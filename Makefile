# Everything a fresh machine needs: Python 3.11 and the package registries.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean dns-deps web-deps observe-deps etcd-deps lab lab-deps

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "manycast needs $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/manycast demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: dns-deps web-deps observe-deps etcd-deps lint typecheck unit

# Debian's knot for the naming tests against a real DNS server: installed when
# root, otherwise those tests skip and say how to install it.
KNOT_PKGS := knot knot-dnsutils
dns-deps:
	@if { command -v knotd || test -x /usr/sbin/knotd; } >/dev/null 2>&1 && command -v kdig >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends $(KNOT_PKGS) \
	    || { apt-get update -q && apt-get install -y -q --no-install-recommends $(KNOT_PKGS); }; \
	else echo "knot is not installed and this is not root: the knot tests will skip (sudo make dns-deps installs it)"; fi

# Debian's chromium for the dashboard's browser test (driven by Playwright, which
# downloads no browser of its own): installed when root, otherwise that test skips.
web-deps:
	@if test -x /usr/bin/chromium; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends chromium \
	    || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }; \
	else echo "chromium is not installed and this is not root: the browser test will skip (sudo make web-deps installs it)"; fi

# Debian's prometheus (a real server scrapes a demo's metrics) and tshark (the tests
# read the captures of --pcap and load contrib/wireshark/manycast.lua): installed when
# root, otherwise those tests skip and say how to install them. tshark's debconf
# question (may non-root users capture?) is answered no.
OBSERVE_PKGS := prometheus tshark
observe-deps:
	@if { command -v prometheus && command -v tshark; } >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections; \
	  apt-get install -y -q --no-install-recommends $(OBSERVE_PKGS) \
	    || { apt-get update -q && apt-get install -y -q --no-install-recommends $(OBSERVE_PKGS); }; \
	else echo "prometheus or tshark is not installed and this is not root: the tests that need them will skip (sudo make observe-deps)"; fi

# Debian's etcd-server: the tests of a pool coordinated in etcd start a three-member
# cluster on loopback. Installed when root, otherwise those tests skip and say so.
etcd-deps:
	@if { command -v etcd || test -x /usr/bin/etcd; } >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends etcd-server \
	    || { apt-get update -q && apt-get install -y -q --no-install-recommends etcd-server; }; \
	else echo "etcd is not installed and this is not root: the etcd coordination tests will skip (sudo make etcd-deps installs it)"; fi

# The kernel lab (root only): the demo topology in network namespaces, routed by
# the kernel's multicast forwarding, with the scenario run against it.
lab: $(STAMP)
	@if [ "$$(id -u)" != 0 ]; then echo "make lab needs root: the kernel lab builds network namespaces and drives the kernel's multicast routing (try: sudo make lab)"; exit 1; fi
	@$(MAKE) --no-print-directory lab-deps
	$(BIN)/manycast lab run

# Debian's iperf (2), socat, curl and wrk: third-party clients for the lab and its
# tests; nftables: the VIP pool's edge routers carry a flow's tag as its conntrack mark;
# tcpdump and tshark (its dumpcap): `manycast lab capture` inside a node's namespace.
LAB_PKGS := iperf socat curl wrk nftables tcpdump tshark keepalived iptables
lab-deps:
	@if { command -v iperf && command -v socat && command -v curl && command -v wrk \
	    && { command -v nft || test -x /usr/sbin/nft; } \
	    && { command -v tcpdump || test -x /usr/sbin/tcpdump; } && command -v tshark && test -x /usr/sbin/keepalived && test -x /usr/sbin/iptables; } >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections; \
	  apt-get install -y -q --no-install-recommends $(LAB_PKGS) \
	    || { apt-get update -q && apt-get install -y -q --no-install-recommends $(LAB_PKGS); }; \
	else echo "iperf, socat, curl, wrk, nft, tcpdump, tshark, keepalived or iptables is missing and this is not root: the lab tests that need them will skip (sudo make lab-deps)"; fi

bench: $(STAMP)
	for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
