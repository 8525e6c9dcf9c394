# The two commands of the README:
#   make run   - set up (venv + install, first time) and materialize every asset on the demo data
#   make test  - set up (first time) and run the test suite
PYTHON ?= python3
VENV := .venv
# Reinstall when the dependencies change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
export DAGSTER_HOME := $(abspath storage/dagster)

.PHONY: run test setup browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(VENV)/bin/cdsr run

test: $(STAMP)
	$(VENV)/bin/python -m pytest

# Debian's Chromium and ChromeDriver for the browser tests (tests/test_browser.py skips
# without them); as root, from Debian's packages (nothing downloads a browser build).
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
