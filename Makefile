# jitgate: `make demo` and `make test` are the whole quick start.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: tools demo test check lint typecheck unit protos up bench bench-grant-path bench-verifier bench-audit bench-audit-crash bench-proxy bench-grants bench-hop bench-wsframes bench-soak bench-faults interop clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# sshd and ssh, from the distribution's packages where missing (see the script).
tools:
	@scripts/system-tools

# Start the whole stack, show an agent getting, being denied and losing a grant.
demo: $(STAMP) tools
	$(BIN)/jitgate demo

# Start the stack in the foreground (Ctrl-C stops it).
up: $(STAMP)
	$(BIN)/jitgate up

test: check tools unit

check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy resolves `jitgate` through a link to services/, the package's root.
typecheck: $(STAMP)
	@mkdir -p .build/typing && ln -sfn ../../services .build/typing/jitgate
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

# Every benchmark; results go in bench/RESULTS.md.
bench: bench-grants bench-hop bench-grant-path bench-verifier bench-audit bench-proxy bench-wsframes

# RequestGrant at saturation and at fixed rates, beside a no-op chain of the same hops.
bench-grants: $(STAMP)
	$(BIN)/python bench/grants.py

# One mTLS hop: a unary call beside a message on an open stream, CPU per call.
bench-hop: $(STAMP)
	$(BIN)/python bench/hop.py

# Ten minutes at 200 grants/s: errors, latency by minute, every process's RSS.
bench-soak: $(STAMP)
	$(BIN)/python bench/soak.py

# Latency of the grant path next to a one-hop floor.
bench-grant-path: $(STAMP)
	$(BIN)/python bench/grant_path.py

# Verifications per second on one core beside the bare RSA check; the kid storm's fetch count.
bench-verifier: $(STAMP)
	$(BIN)/python bench/verifier.py

# Durable audit appends/s with group commit beside one fsync per record; verifying 1M records.
bench-audit: $(STAMP)
	$(BIN)/python bench/audit.py

# The PostgreSQL proxy beside a direct TLS connection (and PgBouncer, if installed).
bench-proxy: $(STAMP)
	@scripts/system-tools bench
	$(BIN)/python bench/proxy.py

# The Kubernetes front end's WebSocket re-cut beside the TLS the relay does anyway.
bench-wsframes: $(STAMP)
	$(BIN)/python bench/wsframes.py

# SIGKILL the audit process under load 100 times; fails if an acknowledged append is lost.
bench-audit-crash: $(STAMP)
	$(BIN)/python bench/audit_crash.py

# SIGKILL and SIGSTOP audit, verifier, policy and Redis under load: fail fast, closed, recover.
bench-faults: $(STAMP)
	$(BIN)/python bench/faults.py

# jitgate against panva's oidc-provider instead of the dev IdP (needs Node.js and npm).
interop: $(STAMP)
	$(BIN)/python interop/run.py

protos: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf .build .jitgate .pytest_cache .mypy_cache .ruff_cache
