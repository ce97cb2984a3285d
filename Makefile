# hrmspec — the two commands of the quick start, and a few more.
#   make demo   install what is needed, then train the CPU demo (specs/hrm-text-tiny.yaml)
#   make test   install what is needed (with the dev extras), then lint and run the test suite
#   make test-deep   the whole suite, slow tests too, with the deep hypothesis profile
#   make mutate      apply a fixed list of realistic bugs one at a time; does the suite catch each? (tests/mutate.py)
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check
# torch first and pinned: this version has a CPU build; an unpinned torch pulls a CUDA build of several GB
TORCH ?= torch==2.13.0
OUT ?= runs/hrm-text-tiny

.PHONY: install install-dev demo test test-all test-deep lint bench mutate

# pip runs again only when pyproject.toml changed since the last install into this Python from this
# checkout (a stamp per interpreter under .make/), or when hrmspec.runtime (mapped by the install, unlike the
# hrmspec folder the current directory shadows) does not import from here; `rm -rf .make`
# forces it. A fresh clone has no stamp, so it installs.
PY_ID := $(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])')
HERE_OK := $(shell $(PYTHON) -c 'import os, sys, hrmspec.runtime as r; sys.exit(os.path.dirname(os.path.dirname(os.path.abspath(r.__file__))) != os.getcwd())' 2>/dev/null && echo yes)
ifneq ($(HERE_OK),yes)
$(shell rm -f .make/installed-$(PY_ID) .make/installed-dev-$(PY_ID))
endif

install: .make/installed-$(PY_ID)

install-dev: .make/installed-dev-$(PY_ID)

.make/installed-$(PY_ID): pyproject.toml
	$(PIP) $(TORCH)
	$(PIP) -e .
	@mkdir -p .make && touch $@

.make/installed-dev-$(PY_ID): pyproject.toml
	$(PIP) $(TORCH)
	$(PIP) -e '.[dev]'
	@mkdir -p .make && touch $@ .make/installed-$(PY_ID)

demo: install
	$(PYTHON) -m hrmspec train specs/hrm-text-tiny.yaml --out $(OUT) --overwrite
	$(PYTHON) -m hrmspec eval $(OUT) --n 500

lint:
	$(PYTHON) -m ruff check .

test: install-dev lint
	$(PYTHON) -m pytest -q -m "not slow"

test-all: install-dev lint
	$(PYTHON) -m pytest -q

# every test, slow ones included, with the deep hypothesis profile (up to 2000 examples, 300 s per property)
test-deep: install-dev lint
	$(PYTHON) -m pytest -q --hypothesis-profile=deep

# not part of make test: each mutation reruns the tests that should catch it (about 6 minutes)
mutate: install-dev
	$(PYTHON) tests/mutate.py

bench: install-dev
	$(PYTHON) benchmarks/report.py
