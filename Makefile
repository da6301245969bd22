# The two set-up commands of the README:  `make demo`  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3.10 || echo python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs/demo

.PHONY: demo test install lint bench clean
install: $(VENV)/.installed

# pybullet (the render extra) has wheels for Python 3.10/3.11 only, mediapipe up to 3.12: their
# markers leave them out on a newer one, and the last step names what was left out.
# mediapipe goes in without the dependencies its wheel declares (see pyproject.toml).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,video,render]'
	$(BIN)/pip install -q -c constraints.txt --no-deps 'mediapipe==0.10.14; python_version < "3.13"'
	$(BIN)/python -m data_shards.extras
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
