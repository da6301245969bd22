# The two set-up commands of the README:  `make demo`  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3.10 || echo python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs/demo

.PHONY: demo test install lint bench clean gpu-bundle reliability
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

# The carry folder .gpu/ of benchmarks/gpu_check.sh (docs/benchmarks.md, "GPU check").
gpu-bundle: install
	PYTHON=$(BIN)/python bash benchmarks/gpu_bundle.sh

# docs/reliability.md from a run of the fault suite: the tests marked `fault` (tests/faultlog.py;
# the slow ones too with SLOW=1), the 1,000-mutation shard fuzzer, then the page made from both
# (tests/faults_report.py). Failed cases are shown on the page; the target then exits 1.
FAULTS ?= runs/reliability
FAULT_MARKS = fault and not gpu and not multigpu$(if $(SLOW),, and not slow)
reliability: install
	@mkdir -p $(FAULTS) && rm -f $(FAULTS)/faults.jsonl $(FAULTS)/fuzz.json
	$(BIN)/pytest -m "$(FAULT_MARKS)" --fault-log $(FAULTS)/faults.jsonl $(PYTEST_ARGS); \
		echo $$? > $(FAULTS)/pytest.rc
	$(BIN)/python tests/data_shards/fuzz_shards.py --count 1000 --out $(FAULTS)/fuzz.json; \
		echo $$? > $(FAULTS)/fuzz.rc
	$(BIN)/python tests/faults_report.py --log $(FAULTS)/faults.jsonl --fuzz $(FAULTS)/fuzz.json \
		--out docs/reliability.md --command "make reliability$(if $(SLOW), SLOW=1)"
	@rc="$$(cat $(FAULTS)/pytest.rc) $$(cat $(FAULTS)/fuzz.rc)"; test "$$rc" = "0 0" || \
		{ echo "reliability: exit codes (tests, fuzzer) $$rc; the failures are on the page"; exit 1; }

clean:
	rm -rf $(VENV) runs
