#!/usr/bin/env bash
# On a lent Hopper GPU, in one go (about 8 minutes at most, each step capped by `timeout`):
#   1. the GPU-marked tests (the decode kernel compiled and run against the reference),
#   2. the MLA decode benchmark on a slice of FlashMLA's grid (with the copy bandwidth and the
#      bf16 matmul rate measured in the same run),
#   3. the GPU mode of bench/generate.py.
# Results land in bench/results/ (one file per step, named by device and date), logs too.
# Needs a Python whose jax sees the GPU (jax[cuda12]); `PYTHON=... bench/gpu_check.sh` picks one.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export JAX_PLATFORMS=cuda          # tests/conftest.py defaults to cpu only when this is unset
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=bench/results
mkdir -p "$out"
stamp=$(date -u +%Y-%m-%d)
device=$("$PY" -c 'import jax; d = jax.devices()[0]; assert d.platform == "gpu", d; print(d.device_kind.replace(" ", "_"))') || {
  echo "gpu_check: jax sees no GPU here (JAX_PLATFORMS=cuda); nothing run" >&2; exit 2; }
echo "gpu_check: $device, $("$PY" -c 'import jax; print("jax", jax.__version__)')"
status=0

# 1. GPU tests: 150 s.
timeout 150 "$PY" -m pytest -q -m gpu tests/pallas_kernels -p no:cacheprovider \
  2>&1 | tee "$out/gpu_tests-$device-$stamp.log" || status=1

# 2. FlashMLA-grid slice: 210 s (shapes not started within 180 s are listed as skipped).
timeout 210 "$PY" bench/mla_decode.py --grid check --time-budget 180 \
  --out "$out/mla_decode-$device-$stamp.json" 2>&1 | tee "$out/mla_decode-$device-$stamp.log" \
  || status=1

# 3. End-to-end decode (V2-Lite layer shapes, random weights): 120 s.
timeout 120 "$PY" bench/generate.py --mode gpu 2>&1 | tee "$out/generate-gpu-$device-$stamp.log" \
  || status=1

ls -l "$out" | grep -- "$stamp"
exit $status
