#!/usr/bin/env bash
# The GPU readiness check on a single-GPU machine, in under 8 minutes (docs/benchmarks.md,
# "GPU check"). Build the carry folder first, here: bash benchmarks/gpu_bundle.sh. Then
#   device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=540)
#   elsewhere:    bash benchmarks/gpu_check.sh OUT/gpu_check.json [bench_gpu.py options]
# 1. installs the carried wheels (.gpu/whl) into /tmp/site; the project runs from the checkout
#    (PYTHONPATH): nothing else is installed, no network is needed;
# 2. prints versions and nvidia-smi;
# 3. runs benchmarks/bench_gpu.py: the gpu-marked tests (time-limited), frames/s of the plain
#    loop, the DeepSpeed engine and `posebert pretrain` from the carried shards with CPU and GPU
#    decoding at 128 and 224 px, MFU, the 1M x 1M x 256 top-1 search; each part has its own
#    budget and is cut short or skipped, with the reason recorded, rather than overrun;
# 4. leaves gpu_check.json, gpu_check.md and gpu_check.log in $OUT (or beside the JSON given).
set -uo pipefail
START=$SECONDS
LIMIT_S=${GPU_CHECK_LIMIT_S:-470}  # the whole script, install included (8 minutes = 480 s)
cd "$(dirname "$0")/.." || exit 2

JSON=
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    JSON=$1
    shift
elif [ -n "${OUT:-}" ]; then
    JSON=$OUT/gpu_check.json
fi
if [ -z "$JSON" ]; then
    echo "usage: gpu_check.sh OUT.json [bench_gpu.py options]  (or set OUT)" >&2
    exit 2
fi
mkdir -p "$(dirname "$JSON")"
exec > >(tee -a "${JSON%.json}.log") 2>&1
TEE=$!

PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
if ! ls .gpu/whl/*.whl >/dev/null 2>&1 || [ ! -d .gpu/shards ]; then
    echo "gpu_check: .gpu/ is missing: run benchmarks/gpu_bundle.sh on the CPU machine and" \
        "carry .gpu" >&2
    exit 2
fi
echo "== gpu_check: installing the carried wheels into $SITE"
if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .gpu/whl/*.whl; then
    echo "gpu_check: installing .gpu/whl failed" >&2
    exit 1
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

echo "== gpu_check: versions"
"$PY" - <<'EOF' || { echo "gpu_check: the project does not import here" >&2; exit 1; }
import importlib.metadata as md
import platform

import torch

import posebert.cli  # noqa: F401  (the command the end-to-end runs use)
import pretrain.run  # noqa: F401

names = ("torch", "torchvision", "deepspeed", "timm", "transformers", "accelerate",
         "webdataset", "pydantic", "numpy", "pytest")
print(f"python {platform.python_version()}; CUDA {torch.version.cuda}; cuDNN "
      f"{torch.backends.cudnn.version()}; GPU "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
print("; ".join(f"{n} {md.version(n)}" for n in names))
EOF
nvidia-smi || echo "gpu_check: nvidia-smi failed"

left=$((LIMIT_S - (SECONDS - START)))
[ "$left" -gt 90 ] || left=90  # a slow install still leaves the sections their minimum
echo "== gpu_check: bench_gpu.py with $((left - 25)) s of $LIMIT_S left"
timeout -k 10 $((left - 5)) "$PY" benchmarks/bench_gpu.py --device cuda --shards .gpu/shards \
    --json "$JSON" --budget-s $((left - 25)) "$@"
rc=$?
echo "gpu_check: done in $((SECONDS - START)) s (bench_gpu.py exit $rc): $JSON," \
    "${JSON%.json}.md, ${JSON%.json}.log"
exec >&- 2>&-
wait "$TEE" 2>/dev/null  # the log complete before the files are collected
exit $rc
