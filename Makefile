# The two set-up commands of the README:  `make demo`  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3.10 || echo python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs/demo

.PHONY: demo test install lint bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,video]'
	$(BIN)/pip install -q -c constraints.txt --no-deps mediapipe==0.10.14  # see pyproject.toml
	touch $@

# Main job: the whole pipeline on the embedded real-motion data (shards, DeepSpeed pretraining
# on 2 processes, export, retrieval, pose and future heads), ending in $(OUT)/results.md.
# DEMO_ARGS=--quick runs it on a sliver in a few minutes.
demo: install
	$(BIN)/posebert demo --out $(OUT) $(DEMO_ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_shards.py

clean:
	rm -rf $(VENV) runs
