# Two entry points for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,samples]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/shpeft demo $(DEMO_ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/sparse_step.py --smoke-test
	$(PY) bench/data_throughput.py --smoke-test
	$(PY) bench/orchestration.py --smoke-test
	$(PY) bench/serve.py --smoke-test
	$(PY) bench/gpu_check.py --smoke-test

clean:
	rm -rf $(VENV) *.egg-info
