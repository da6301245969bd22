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
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

# Main job: build the embedded real-motion shards, verify them, print their statistics and
# draw a contact sheet of the validation split.
demo: install
	$(BIN)/posebert shards synth --out $(OUT)/shards --overwrite $(SYNTH_ARGS)
	$(BIN)/posebert shards verify $(OUT)/shards
	$(BIN)/posebert shards stats $(OUT)/shards
	$(BIN)/posebert shards preview $(OUT)/shards --split val --out $(OUT)/preview-val.png

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_shards.py

clean:
	rm -rf $(VENV) runs
