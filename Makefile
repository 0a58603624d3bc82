# The two commands a new user needs:
#   make demo   runs the main job on embedded defaults
#   make test   installs everything (Python packages, Debian packages, Kafka's jars), runs all tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: demo test install services lint clean bench

# the project (what the demo needs), then the tests' extras
$(VENV)/.installed: pyproject.toml setup.py $(wildcard streams/kernels/*.pyx)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed-test

# Mosquitto from Debian's packages, Kafka's jars from Maven Central (cached in ~/.cache/cloudlet)
services: install
	$(VENV)/bin/cloudlet rig install

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The whole suite runs twice: with the compiled kernels (which must load), then on their
# pure-Python twins (less the Docker-backend tests, whose units run in the image, not here).
test: services lint
	CLOUDLET_REQUIRE_EXTENSIONS=1 $(PY) -m pytest $(ARGS)
	CLOUDLET_NO_EXTENSIONS=1 $(PY) -m pytest -q -m "not docker and not infra" $(ARGS)

# only what the demo uses: the project and Mosquitto (no browser, database, Docker or Kafka)
demo: $(VENV)/.installed
	$(VENV)/bin/cloudlet rig install --demo
	$(VENV)/bin/cloudlet demo $(ARGS)

bench: services
	$(PY) bench/suite.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info test-logs .pytest_cache .hypothesis
