# `make test` and `make run` set up everything they need on a fresh machine,
# and do nothing more when run again.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: test run data setup clean

$(PY):
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,data]'
	touch $(STAMP)

setup: $(STAMP)

data: setup
	PYTHON=$(PY) bash experiments/fetch_data.sh

test: data
	$(PY) -m pytest -q -n 2

# Resumes an existing run; settings as `make run ARGS="--fresh --steps=300"`.
run: data
	$(PY) -m experiments.finetune $(ARGS)

clean:
	rm -rf .venv data runs
