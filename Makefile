# `make demo` and `make test` do all the set-up they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint typecheck unit system-packages readme clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo/demo.py

# nginx and etcd are real servers the tests talk to (etcdctl is the benchmarks' baseline); git (git daemon,
# git http-backend) with fcgiwrap behind nginx, and openssh-server serve the git source's tests, and ssh is
# its client for git+ssh; docker.io is the private Docker engine the image and the compose demo run on,
# and mmdebstrap builds stand-ins for base images no registry can give. Install them when missing and root.
system-packages:
	@missing=""; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	command -v etcdctl >/dev/null 2>&1 || missing="$$missing etcd-client"; \
	[ -x /usr/lib/git-core/git-http-backend ] || missing="$$missing git"; \
	command -v fcgiwrap >/dev/null 2>&1 || [ -x /usr/sbin/fcgiwrap ] || missing="$$missing fcgiwrap"; \
	[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v ssh >/dev/null 2>&1 || missing="$$missing openssh-client"; \
	[ -x /usr/sbin/dockerd ] || missing="$$missing docker.io"; \
	[ -x /usr/bin/mmdebstrap ] || missing="$$missing mmdebstrap"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else \
			echo "missing:$$missing (run as root, or install them, to run every test)"; \
		fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) system-packages
	$(BIN)/pytest

test: lint typecheck unit

# Measures propagation, cold start, idle cost, scale and poll load against real etcd and nginx,
# each beside a baseline from the same run, and writes benchmarks/RESULTS.md.
bench: $(STAMP) system-packages
	$(BIN)/python benchmarks/bench.py --output benchmarks/RESULTS.md

# Regenerates the settings table in README.md from the settings model.
readme: $(STAMP)
	$(BIN)/python -m infantry.docs README.md

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache
