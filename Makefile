# The two commands of the README. Both create .venv when it is missing and install into it.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: run test install

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,peers,hf]'
	touch .venv/.installed

install: .venv/.installed

run: install
	.venv/bin/attnbound reproduce --scale small

test: install
	$(PY) -m pytest -q
