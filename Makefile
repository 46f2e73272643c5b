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

.PHONY: help setup system system-test apt-install venv image lab test lessons demo bench reliability doctor clean

help:
	@echo "make lab          set everything up and open the lessons in JupyterLab"
	@echo "make test         set everything up and run the test suite"
	@echo "make lessons      execute every notebook headless, HTML in build/lessons/"
	@echo "make demo         instructor dashboards (Voila), no code visible"
	@echo "make bench        run the benchmarks in benchmarks/ and print their figures"
	@echo "make reliability  the long reliability and soak runs"
	@echo "make doctor       what this machine can do (QEMU, KVM or TCG, image)"

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

image: venv
	$(PY) -m vmlab image build

doctor: setup
	$(PY) -m vmlab doctor

lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.ip=127.0.0.1 $$([ "$$(id -u)" = 0 ] && echo --allow-root) notebooks/

test: setup system-test
	$(PY) -m pytest $(PYTEST_ARGS)

lessons: setup
	$(PY) -m vmlab.lessons render --quick

DEMO_PORT ?= 8866
demo: setup
	$(VENV)/bin/voila --no-browser --strip_sources=True --Voila.ip=127.0.0.1 --port=$(DEMO_PORT) notebooks/demo

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

reliability: setup
	$(PY) -m pytest -m long tests/ $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache
