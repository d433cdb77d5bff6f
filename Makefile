# atomicfs: `make demo` and `make test` do all set-up on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEB_PACKAGES := fuse3 libfuse3-dev pkg-config gcc libisal-dev xfsprogs e2fsprogs util-linux \
                fio attr
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
NATIVE := atomicfs/_native$(shell $(PYTHON) -c 'import sysconfig;print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null)
DEMO_IMG ?= ./atomicfs.img
PYTEST_ARGS ?=
# The applications of tests/apps (make apps, and make test's short form of them).
APPS_PACKAGES := postgresql mariadb-server sqlite3 fio
APPS_ARGS ?=

.PHONY: setup deps venv native test test-unit test-apps apps-deps lint demo crashtest bench \
        bench-deps profile apps clean

setup: deps venv native
	@test -x $(VENV)/bin/atomicfs

# Debian packages: install only what is missing (idempotent, quiet when all is there).
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; done; \
	if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then missing="$$missing python3-venv"; fi; \
	if ! $(PYTHON) -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"],"Python.h")))'; then missing="$$missing python3-dev"; fi; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	@touch $@

native: $(NATIVE)

$(NATIVE): native/atomicfs_native.c native/atomicfs_native.h native/build.py $(VENV)/.installed
	$(PY) native/build.py

test: setup apps-deps
	CI=$${CI:-} $(PY) -m pytest -q $(PYTEST_ARGS) tests

# Static checks, run before each commit: lint everything, type-check the package.
lint: setup
	$(VENV)/bin/ruff check atomicfs tests bench native
	$(VENV)/bin/mypy atomicfs

# The long form of the crash explorer: power-loss states from recorded runs of every
# workload on an image file, a loop device and an image on XFS (hardware path), SIGKILLs of
# the daemon, then the control run (atomic protection off), which must see torn units.
CRASH_SEED ?= 1
CRASH_STATES ?= 5400
CRASH_KILLS ?= 120
crashtest: setup
	$(PY) -m atomicfs crashtest --workload all --device all --states $(CRASH_STATES) \
	    --kills $(CRASH_KILLS) --seed $(CRASH_SEED)
	$(PY) -m atomicfs crashtest --workload units --device file,xfs --states 200 \
	    --seed $(CRASH_SEED) --control --expect-torn

test-unit: setup
	$(PY) -m pytest -q tests/unit tests/fs

# Databases and fio for tests/apps: install only what is missing. Debian's packages
# create (and, where an init system runs, start) their default clusters on port 5432 and
# the mysql socket; the tests use neither: their servers run on private sockets.
apps-deps:
	@missing=""; for p in $(APPS_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; fi

# The short form of the application tests alone (what make test runs of them).
test-apps: setup apps-deps
	CI=$${CI:-} $(PY) -m pytest -q $(PYTEST_ARGS) tests/apps

# The long form: fio, SQLite, PostgreSQL and MariaDB with repeated crashes, and pgbench
# on atomicfs against kernel XFS; a summary table at the end (APPS_ARGS="--only pgbench").
apps: setup apps-deps
	$(PY) -m tests.apps.run $(APPS_ARGS)

# The demo (as root, under a minute): ext4 and atomicfs under the same power cuts, a PNG of
# their pages, then a short look at atomic folios and write-through.
# DEMO_ARGS passes options, e.g. DEMO_ARGS="--states 1000 --seed 2 --png /tmp/pages.png".
DEMO_ARGS ?=
demo: setup
	DEMO_IMG=$(DEMO_IMG) $(PY) -m atomicfs.demo $(DEMO_ARGS)

# Benchmarks (as root): every target side by side on one loop device; see README "Performance".
# BENCH_ARGS passes options, e.g. BENCH_ARGS="--rounds 5 --runtime 3" or "--targets xfs,nullfs".
BENCH_ARGS ?=
bench: setup bench-deps
	BENCH_COMMAND="make bench$(if $(BENCH_ARGS), BENCH_ARGS='$(BENCH_ARGS)')" $(PY) -m bench $(BENCH_ARGS)

# Where the daemon's time goes (py-spy) on the 16K durable atomic and the cached 16K write.
PROFILE_ARGS ?=
profile: setup bench-deps
	$(PY) -m bench.profile $(PROFILE_ARGS)

# The `bench` extra of pyproject.toml (matplotlib, py-spy), without rebuilding the package.
bench-deps: $(VENV)/.bench-installed

$(VENV)/.bench-installed: pyproject.toml $(VENV)/.installed
	$(PIP) install -q $$($(PY) -c 'import tomllib; print(" ".join(\
	  tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"]))')
	@touch $@

clean:
	rm -rf build *.egg-info atomicfs/_native.* .pytest_cache
