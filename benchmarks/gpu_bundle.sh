#!/usr/bin/env bash
# Build the carry folder of benchmarks/gpu_check.sh, on this CPU machine (docs/benchmarks.md,
# "GPU check"):
#   .gpu/whl/     wheels for Python 3.12 that the lent GPU machine lacks (its image has torch,
#                 timm, transformers, accelerate, pytest; no deepspeed, webdataset, pydantic)
#   .gpu/shards/  small shards at 128 and 224 px made by `posebert shards synth`
# and check that it and the working tree fit the device tool's 64 MiB.
#
#   bash benchmarks/gpu_bundle.sh            # PYTHON=.venv/bin/python, CLIPS=walk,kick
#
# Versions come from constraints.txt. faiss-gpu (135 MB) does not fit: the check's search uses
# torch. deepspeed has no wheel: `pip wheel --no-deps` builds its pure-Python one (2 MB).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
BUNDLE=.gpu
LIMIT_MIB=64
CLIPS=${CLIPS:-walk,kick}  # 15 windows of 4 views x 16 frames: about 21 MB at 224 px
# What the project imports that the GPU image lacks, and what those need (checked against the
# image's package list in the device tool's KINDS.md; pydantic 2.14 needs typing_extensions
# >= 4.16, newer than the image may have).
PURE=(hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions
      webdataset braceexpand)

pin() {  # NAME -> NAME==VERSION from constraints.txt (pip's name normalisation: - _ . alike)
    local norm line
    norm=$(echo "$1" | tr '_.' '--' | tr '[:upper:]' '[:lower:]')
    line=$(sed 's/[[:space:]]*#.*//' constraints.txt |
        awk -F'==' -v n="$norm" '{k=tolower($1); gsub(/[_.]/, "-", k); if (k == n) print}')
    [ -n "$line" ] || { echo "gpu_bundle: $1 is not pinned in constraints.txt" >&2; exit 1; }
    echo "$line"
}

exclude=$(git rev-parse --git-path info/exclude)  # also right in a worktree
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$BUNDLE/" "$exclude" 2>/dev/null || echo "/$BUNDLE/" >>"$exclude"
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/whl" "$BUNDLE/shards"

specs=()
for name in "${PURE[@]}"; do specs+=("$(pin "$name")"); done
echo "gpu_bundle: wheels ${specs[*]} $(pin deepspeed)"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$BUNDLE/whl" "${specs[@]}"
"$PYTHON" -m pip wheel -q --no-deps -w "$BUNDLE/whl" "$(pin deepspeed)"

for px in 128 224; do
    echo "gpu_bundle: shards at $px px ($CLIPS)"
    "$PYTHON" -m posebert shards synth --out "$BUNDLE/shards/$px" --size "$px" \
        --clips "$CLIPS" --val-clips '' --test-clips '' --shard-samples 2 --workers 2
done

bundle=$(du -sb "$BUNDLE" | cut -f1)
# What else travels: tracked files and untracked ones git does not ignore.
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null |
    awk '{s += $1} END {print s + 0}')
total=$((bundle + tree))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "gpu_bundle: $BUNDLE $(mib "$bundle") (wheels $(mib "$(du -sb "$BUNDLE/whl" | cut -f1)")," \
    "shards $(mib "$(du -sb "$BUNDLE/shards" | cut -f1)")) + working tree $(mib "$tree")" \
    "= $(mib "$total") of $LIMIT_MIB MiB"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "gpu_bundle: over the device tool's $LIMIT_MIB MiB: use fewer clips (CLIPS=walk)" >&2
    exit 1
fi
