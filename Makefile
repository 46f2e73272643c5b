# vmlab: the two commands a newcomer needs are `make lab` and `make test`.
# Both install what is missing (Debian packages when root, the venv, the guest
# image) and are fast the second time.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.vmlab-installed
APT_PACKAGES := $(shell grep -v '^\#' apt.txt)
# Only the tests need a browser (the real-browser test drives Debian's chromium).
TEST_APT_PACKAGES := chromium
PYTEST_ARGS ?=

# The learner works on a copy of the lessons (the tracked notebooks/ are the course's source, never
# saved into): `make lab` and `make demo` refresh it without overwriting what the learner changed
# (python -m vmlab.lessons workspace; docs/lessons.md). Ignored by git.
WORKSPACE ?= workspace
LAB_ARGS ?=
# The Korean edition (한국어판, docs/translation.md) is built from the English notebooks and their translations into
# $(WORKSPACE)/ko/ beside the English lessons. `make lab EDITION=ko` (or `make lab LANG=ko`, or a ko_* locale)
# opens it; `make demo EDITION=ko` serves its dashboards. LANG=ko given to make only picks the edition: the
# commands still run under a real locale.
EDITION ?= $(if $(filter ko ko_% ko-%,$(LANG)),ko,en)
ifeq ($(LANG),ko)
  override EDITION := ko
  override LANG := C.UTF-8
  export LANG
endif
EDITION_DIR := $(if $(filter ko,$(EDITION)),ko/,)
# Project Jupyter settings (etc/jupyter): no news pop-up or update check, no CDN, widget views not saved
# into notebooks, Voila dashboards stop their kernel (and VMs) when their tab goes away.
JUPYTER_ENV := JUPYTER_CONFIG_PATH=$(CURDIR)/etc/jupyter JUPYTER_PATH=$(CURDIR)/etc/jupyter/data
ALLOW_ROOT   = $$([ "$$(id -u)" = 0 ] && echo --allow-root)

.PHONY: help setup system system-test apt-install venv image workspace lab test lessons demo bench reliability doctor clean
.PHONY: classroom classroom-load classroom-deps classroom-image

help:
	@echo "make lab          set everything up and open the lessons (your copy, in $(WORKSPACE)/) in JupyterLab"
	@echo "make lab EDITION=ko   the same, opening the Korean edition (한국어판, $(WORKSPACE)/ko/)"
	@echo "make test         set everything up and run the test suite"
	@echo "make lessons      execute every notebook headless, both editions: HTML in build/lessons/ (and ko/); quick mode, VMLAB_QUICK=0 for the full run"
	@echo "make demo         instructor dashboards (Voila), no code visible"
	@echo "make bench        run the benchmarks, judge each figure against benchmarks/targets.toml (BENCH_ARGS=--quick)"
	@echo "make reliability  the long reliability and soak runs"
	@echo "make doctor       what this machine can do (QEMU, KVM or TCG, image)"
	@echo "make classroom   a JupyterHub for a class on this machine (docs/classroom.md)"
	@echo "make classroom-load  1, 2, 4, 8 students at once on that hub: the measured table"

setup: system venv image

# Debian packages: installed with apt-get when root; otherwise the exact command is printed.
system:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APT_PACKAGES)"

system-test:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(TEST_APT_PACKAGES)"

apt-install:
	@missing=""; for p in $(PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "vmlab needs these packages (Debian names):$$missing"; \
	    echo "install their equivalents with your package manager, then run make again"; exit 1; \
	  elif [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null || exit 1; \
	  else \
	    echo "vmlab needs system packages that are not installed. Run:"; \
	    echo "  sudo apt-get update && sudo apt-get install -y$$missing"; \
	    echo "then run make again."; exit 1; \
	  fi; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[lab,dev]'
	@touch $(STAMP)

# The lessons' image (its kernel built once from Debian's source: about 8 min on 2 cores) and the image on Debian's
# packaged kernel (lesson 02.00 looks inside the stock kernel; the boot benchmark's yardstick boots it).
image: venv
	$(PY) -m vmlab image build
	VMLAB_GUEST_KERNEL=debian $(PY) -m vmlab image build

doctor: setup
	$(PY) -m vmlab doctor

# Copy new and updated lessons into the workspace; a lesson the learner edited is kept as it is.
workspace: venv
	$(PY) -m vmlab.lessons workspace --to $(WORKSPACE)
	$(PY) -m vmlab.edition workspace --to $(WORKSPACE)/ko

lab: setup workspace
	$(JUPYTER_ENV) $(VENV)/bin/jupyter lab --ServerApp.ip=127.0.0.1 $(ALLOW_ROOT) \
	  --ServerApp.root_dir=$(WORKSPACE) --LabApp.default_url=/lab/tree/$(EDITION_DIR)00.00-Index.ipynb $(LAB_ARGS)

# Two passes: the tests that may share the machine on TEST_JOBS workers (a file stays on one worker, so its module-scoped
# guests boot once), then the serial ones alone (tests/conftest.py SERIAL_MODULES). Both passes always run;
# `make test` fails if either failed ("no tests selected", exit 5, is not a failure: PYTEST_ARGS may select few).
TEST_JOBS ?= 2
test: setup system-test classroom-deps
	@rc=0; \
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile -m "not long and not serial" --durations=15 $(PYTEST_ARGS) || rc=$$?; \
	[ $$rc = 5 ] && rc=0; rc2=0; \
	$(PY) -m pytest -m "serial and not long" --durations=5 $(PYTEST_ARGS) || rc2=$$?; \
	[ $$rc2 = 5 ] && rc2=0; \
	echo "make test: parallel pass exit $$rc, serial pass exit $$rc2"; [ $$rc = 0 ] && [ $$rc2 = 0 ]

# quick mode unless VMLAB_QUICK=0 (`make lessons VMLAB_QUICK=0`: the full run, minutes per lesson)
LESSONS_MODE = $(if $(filter 0,$(VMLAB_QUICK)),,--quick)
lessons: setup
	$(PY) -m vmlab.lessons render $(LESSONS_MODE)
	$(PY) -m vmlab.edition render $(LESSONS_MODE)

DEMO_PORT ?= 8866
demo: setup workspace
	$(JUPYTER_ENV) $(VENV)/bin/voila --no-browser --Voila.ip=127.0.0.1 --port=$(DEMO_PORT) $(WORKSPACE)/$(EDITION_DIR)demo

bench: setup
	$(PY) -m benchmarks $(BENCH_ARGS)

reliability: setup
	$(PY) -m pytest -m long tests/ $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache

# ---- the classroom (docs/classroom.md): a JupyterHub for a class on this machine, and its load run.
# classroom-deps: the hub (pip extra "classroom") and configurable-http-proxy from npm, in build/ (not global).
CLASS_DIR   := build/classroom
CLASS_VENV  := $(CLASS_DIR)/venv
CLASS_CACHE := $(CLASS_DIR)/image-cache
CLASS_STAMP := $(VENV)/.vmlab-classroom
CHP         := $(CLASS_DIR)/node/node_modules/.bin/configurable-http-proxy
CLASS_SIZES ?= 1,2,4,8

classroom-deps: $(CLASS_STAMP) $(CHP)

$(CLASS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[lab,dev,classroom]'
	@touch $@

# configurable-http-proxy 5 needs node >= 20; Debian 12's node 18 gets 4.6.
$(CHP):
	@command -v npm >/dev/null 2>&1 || $(MAKE) --no-print-directory apt-install PACKAGES="nodejs npm"
	@v=$$(node -p 'process.versions.node.split(".")[0]'); chp=5.3.0; [ "$$v" -ge 20 ] || chp=4.6.3; \
	  echo "installing configurable-http-proxy@$$chp into $(CLASS_DIR)/node"; \
	  npm install --prefix $(CLASS_DIR)/node --no-audit --no-fund --loglevel=error configurable-http-proxy@$$chp

# The students' Python, made from the system's python3 so that every student uid can run it.
$(CLASS_VENV)/.installed: pyproject.toml
	@$(MAKE) --no-print-directory apt-install PACKAGES="python3-venv"
	umask 022; /usr/bin/python3 -m venv $(CLASS_VENV) && $(CLASS_VENV)/bin/pip install -q -e '.[lab,classroom]'
	@touch $@

# The shared guest image cache: built once, then read-only for the students. The lesson kernel `make image` built is
# copied in (not built again).
classroom-image: venv image
	mkdir -p -m 0700 $(CLASS_CACHE)/kernels $(CLASS_CACHE)/busybox
	cp -a -n "$$($(PY) -c 'from vmlab.config import cache_subdir; print(cache_subdir("kernels"))')"/. $(CLASS_CACHE)/kernels/
	cp -a -n "$$($(PY) -c 'from vmlab.config import cache_subdir; print(cache_subdir("busybox"))')"/. $(CLASS_CACHE)/busybox/
	VMLAB_CACHE=$(CURDIR)/$(CLASS_CACHE) $(PY) -m vmlab image build
	VMLAB_CACHE=$(CURDIR)/$(CLASS_CACHE) VMLAB_GUEST_KERNEL=debian $(PY) -m vmlab image build
	chmod -R a+rX,go-w $(CLASS_CACHE)

classroom: setup classroom-deps $(CLASS_VENV)/.installed classroom-image
	$(VENV)/bin/jupyterhub -f classroom/jupyterhub_config.py

classroom-load: setup classroom-deps $(CLASS_VENV)/.installed classroom-image
	$(PY) classroom/load.py --students $(CLASS_SIZES)
