# atomicfs: `make demo` and `make test` do all set-up on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Debian packages split like the Python extras: running (and building the C core) needs
# RUN_PACKAGES; the tests and benchmarks add TEST_PACKAGES (kernel filesystems to compare
# with and to host the hardware path, fio, xattr tools, and the foreign filesystems that
# mkfs must refuse to overwrite).
RUN_PACKAGES := fuse3 libfuse3-dev pkg-config gcc libisal-dev util-linux
DEMO_PACKAGES := e2fsprogs  # the demo's kernel ext4 side
TEST_PACKAGES := xfsprogs e2fsprogs fio attr util-linux-extra squashfs-tools genisoimage \
                 f2fs-tools fdisk man-db
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
NATIVE := atomicfs/_native$(shell $(PYTHON) -c 'import sysconfig;print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null)
DEMO_IMG ?= ./atomicfs.img
PYTEST_ARGS ?=
# The applications of tests/apps (make apps, and make test's short form of them).
APPS_PACKAGES := postgresql mariadb-server sqlite3 fio
APPS_ARGS ?=
# Every pip install takes its versions from the lock file (make lock refreshes it) and is
# quiet: its output is shown only when it fails.
CONSTRAINTS := constraints.txt
BUILD_REQUIRES := $$($(PYTHON) -c 'import tomllib; print(" ".join(r for r in \
                  tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
PIP_QUIET = pip_log=$$(mktemp); if ! $(1) -c $(CONSTRAINTS) >$$pip_log 2>&1; then \
            cat $$pip_log; rm -f $$pip_log; exit 1; fi; rm -f $$pip_log
EXTRA = $$($(PY) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", \
        "rb"))["project"]["optional-dependencies"]["$(1)"]))')

# make install: a self-contained virtual environment under $(PREFIX)/lib/atomicfs with the
# package and its run-time dependencies only; commands are links into it. mount(8) looks for
# its helpers only in /sbin, /sbin/fs.d and /sbin/fs, so the mount.* and umount.* links go
# to SBINDIR (/sbin, which is /usr/sbin on Debian 12) whatever PREFIX is.
PREFIX ?= /usr/local
SBINDIR ?= /sbin
INSTALL_ENV = $(PREFIX)/lib/atomicfs
MANDIR ?= $(PREFIX)/share/man
COMPLETIONDIR ?= $(PREFIX)/share/bash-completion/completions
DOCDIR := build/doc
MOUNT_LINKS := mount.atomicfs mount.fuse.atomicfs umount.atomicfs umount.fuse.atomicfs
MAN_PAGES := atomicfs.8 mount.atomicfs.8 umount.atomicfs.8 mkfs.atomicfs.8 fsck.atomicfs.8

.PHONY: setup run-setup deps test-deb-deps venv test-deps lint-deps docs-deps native test \
        test-unit test-apps apps-deps lint demo crashtest bench bench-deps profile apps clean \
        docs install uninstall lock apt-install

# Everything a developer needs: running, tests and lint.
setup: run-setup test-deb-deps test-deps lint-deps
	@test -x $(VENV)/bin/atomicfs

# What running needs and nothing more (make demo).
run-setup: deps venv native

# Debian packages: install only what is missing (idempotent, quiet when all is there).
deps:
	@$(MAKE) --no-print-directory apt-install APT_LIST="$(RUN_PACKAGES)" PY_HEADERS=1

test-deb-deps:
	@$(MAKE) --no-print-directory apt-install APT_LIST="$(TEST_PACKAGES)"

apt-install:
	@missing=""; for p in $(APT_LIST); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$(PY_HEADERS)" ]; then \
	  if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then missing="$$missing python3-venv"; fi; \
	  if ! $(PYTHON) -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"],"Python.h")))'; then missing="$$missing python3-dev"; fi; \
	fi; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; fi

venv: $(VENV)/.installed

# The package (editable) with its run-time dependencies only, and what building the C core
# in place needs (make native).
$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(call PIP_QUIET,$(PIP) install -e . $(BUILD_REQUIRES))
	@touch $@

# The extras of pyproject.toml, each installed by the targets that need it.
test-deps: $(VENV)/.test-installed
lint-deps: $(VENV)/.lint-installed
docs-deps: $(VENV)/.docs-installed
bench-deps: $(VENV)/.bench-installed

$(VENV)/.%-installed: pyproject.toml $(CONSTRAINTS) $(VENV)/.installed
	@$(call PIP_QUIET,$(PIP) install $(call EXTRA,$*))
	@touch $@

# Refresh the lock file: resolve the package with every extra in a scratch environment
# and pin what pip would install (run after changing dependencies; commit the result).
lock:
	@rm -rf build/lock && $(PYTHON) -m venv build/lock
	@pip_log=$$(mktemp); if ! build/lock/bin/pip install --dry-run --ignore-installed \
	  --report build/lock/report.json '.[test,lint,docs,bench]' $(BUILD_REQUIRES) >$$pip_log 2>&1; then \
	  cat $$pip_log; rm -f $$pip_log; exit 1; fi; rm -f $$pip_log
	@$(PYTHON) tools/lock.py build/lock/report.json $(CONSTRAINTS)
	@rm -rf build/lock

native: $(NATIVE)

native: atomicfs/libatomicfs-preload.so atomicfs/libatomicfs-fuseconn.so

$(NATIVE) atomicfs/libatomicfs-preload.so atomicfs/libatomicfs-fuseconn.so &: \
        native/atomicfs_native.c native/atomicfs_native.h native/afs_statx.h native/preload.c \
        native/fuseconn.c native/build.py $(VENV)/.installed
	$(PY) native/build.py

test: setup apps-deps docs-deps
	CI=$${CI:-} $(PY) -m pytest -q $(PYTEST_ARGS) tests

# Static checks, run before each commit: lint everything, type-check the package.
lint: run-setup lint-deps
	$(VENV)/bin/ruff check atomicfs tests bench native tools
	$(VENV)/bin/mypy atomicfs

# The long form of the crash explorer: power-loss states from recorded runs of every
# workload on an image file, a loop device and an image on XFS (hardware path), SIGKILLs of
# the daemon, then the control runs (atomic protection off), which must see torn units.
# The rwf workload (RWF_ATOMIC through the preload library) restarts the explorer under it;
# it gets a run of its own too, so that its whole-write oracle sees thousands of states.
CRASH_SEED ?= 1
CRASH_STATES ?= 5400
CRASH_KILLS ?= 120
CRASH_RWF_STATES ?= 2100
crashtest: setup
	$(PY) -m atomicfs crashtest --workload all --device all --states $(CRASH_STATES) \
	    --kills $(CRASH_KILLS) --seed $(CRASH_SEED)
	$(PY) -m atomicfs crashtest --workload rwf --device all --states $(CRASH_RWF_STATES) \
	    --kills 30 --seed $$(($(CRASH_SEED) + 100))
	$(PY) -m atomicfs crashtest --workload units --device file,xfs --states 200 \
	    --seed $(CRASH_SEED) --control --expect-torn
	$(PY) -m atomicfs crashtest --workload rwf --device file --states 100 \
	    --seed $(CRASH_SEED) --control --expect-torn

test-unit: setup
	$(PY) -m pytest -q tests/unit tests/fs

# Databases and fio for tests/apps: install only what is missing. Debian's packages
# create (and, where an init system runs, start) their default clusters on port 5432 and
# the mysql socket; the tests use neither: their servers run on private sockets.
apps-deps:
	@$(MAKE) --no-print-directory apt-install APT_LIST="$(APPS_PACKAGES)"

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
demo: run-setup
	@$(MAKE) --no-print-directory apt-install APT_LIST="$(DEMO_PACKAGES)"
	DEMO_IMG=$(DEMO_IMG) $(PY) -m atomicfs.demo $(DEMO_ARGS)

# Benchmarks (as root): every target side by side on one loop device, then the pgbench row
# (PostgreSQL: BENCH_PACKAGES); see README "Performance". BENCH_ARGS passes options, e.g.
# BENCH_ARGS="--rounds 5 --runtime 3", "--targets xfs,nullfs" or "--workloads pgbench".
BENCH_ARGS ?=
BENCH_PACKAGES := postgresql
bench: setup test-deb-deps bench-deps
	@$(MAKE) --no-print-directory apt-install APT_LIST="$(BENCH_PACKAGES)"
	BENCH_COMMAND="make bench$(if $(BENCH_ARGS), BENCH_ARGS='$(BENCH_ARGS)')" $(PY) -m bench $(BENCH_ARGS)

# Where the daemon's time goes (py-spy) on the 16K durable atomic and the cached 16K write.
PROFILE_ARGS ?=
profile: setup bench-deps
	$(PY) -m bench.profile $(PROFILE_ARGS)

# Man pages and bash completion, generated from the same argparse parsers as --help.
docs: run-setup docs-deps
	@$(PY) -m atomicfs.manpages $(DOCDIR)

# Idempotent; as root. PREFIX=/opt/atomicfs puts everything but the mount helpers there.
install: docs atomicfs/libatomicfs-preload.so atomicfs/libatomicfs-fuseconn.so
	@test -x $(INSTALL_ENV)/bin/python || $(PYTHON) -m venv $(INSTALL_ENV)
	@$(call PIP_QUIET,$(INSTALL_ENV)/bin/pip install .)
	@install -m 755 atomicfs/libatomicfs-preload.so $(INSTALL_ENV)/bin/  # atomicfs run's
	@install -m 755 atomicfs/libatomicfs-fuseconn.so $(INSTALL_ENV)/bin/  # the daemon's
	@install -d $(PREFIX)/bin $(PREFIX)/sbin $(SBINDIR) $(MANDIR)/man8 $(COMPLETIONDIR)
	@ln -sfn $(INSTALL_ENV)/bin/atomicfs $(PREFIX)/bin/atomicfs
	@for t in mkfs fsck; do ln -sfn $(INSTALL_ENV)/bin/$$t.atomicfs $(PREFIX)/sbin/$$t.atomicfs; done
	@ln -sfn $(INSTALL_ENV)/bin/fsck.atomicfs $(PREFIX)/sbin/fsck.fuse.atomicfs
	@for l in $(MOUNT_LINKS); do \
	  ln -sfn $(INSTALL_ENV)/bin/$${l/.fuse./.} $(SBINDIR)/$$l; done
	@for m in $(MAN_PAGES); do install -m 644 $(DOCDIR)/$$m $(MANDIR)/man8/$$m; done
	@install -m 644 $(DOCDIR)/atomicfs.bash $(COMPLETIONDIR)/atomicfs
	@echo "installed atomicfs in $(INSTALL_ENV); commands in $(PREFIX)/bin, $(PREFIX)/sbin," \
	  "mount helpers in $(SBINDIR)"

uninstall:
	rm -f $(PREFIX)/bin/atomicfs $(PREFIX)/sbin/mkfs.atomicfs $(PREFIX)/sbin/fsck.atomicfs \
	  $(PREFIX)/sbin/fsck.fuse.atomicfs $(addprefix $(SBINDIR)/,$(MOUNT_LINKS)) \
	  $(addprefix $(MANDIR)/man8/,$(MAN_PAGES)) $(COMPLETIONDIR)/atomicfs
	rm -rf $(INSTALL_ENV)

clean:
	rm -rf build *.egg-info atomicfs/_native.* atomicfs/libatomicfs-preload.so \
	  atomicfs/libatomicfs-fuseconn.so .pytest_cache
