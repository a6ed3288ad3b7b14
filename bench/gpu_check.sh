#!/usr/bin/env bash
# The one script run on a lent GPU machine (no network; torch+CUDA, nvcc, cmake, pybind11 preinstalled).
# Builds the CUDA engine, runs the gpu-marked tests, then the bandwidth bench (its table is printed last).
# Logs go to ${OUT:-/tmp/amoeba_gpu_check}. Finishes in well under 6 minutes (per-step timeouts).
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-/tmp/amoeba_gpu_check}"
mkdir -p "$LOG_DIR"
export OUT="$LOG_DIR"

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG_DIR/nvidia_smi.txt"

echo "== build (AMOEBA_CUDA=ON; log: $LOG_DIR/build.log)"
if ! AMOEBA_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" timeout 150 \
    pip install --no-build-isolation --no-deps -e . -v >"$LOG_DIR/build.log" 2>&1; then
  tail -40 "$LOG_DIR/build.log"
  exit 1
fi
grep -E "CUDA engine|amoeba_core: built" "$LOG_DIR/build.log" || true
python -c "import amoeba_core._C as C; print('cuda_compiled', C.cuda_compiled, 'devices', C.cuda_device_count())"

echo "== tests (-m gpu; log: $LOG_DIR/pytest_gpu.log)"
set +e
timeout 120 python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$LOG_DIR/pytest_gpu.log" | tail -25
test_rc=${PIPESTATUS[0]}
set -e

echo "== elastic regions: VMM resize throughput, driver memory vs mapped (log: $LOG_DIR/elastic_bench.log)"
timeout 60 python bench/elastic_bench.py --device cuda --mib 4096 --repeats 2 --json "$LOG_DIR/elastic_bench.json" \
  2>&1 | tee "$LOG_DIR/elastic_bench.log" || true

echo "== same-host pull through CUDA IPC vs device-to-device (log: $LOG_DIR/samehost_bench.log)"
timeout 60 python bench/samehost_bench.py --device cuda --mib 512 --runs 1024,4096,65536,contiguous \
  --json "$LOG_DIR/samehost_bench.json" 2>&1 | tee "$LOG_DIR/samehost_bench.log" || true

echo "== bandwidth (log: $LOG_DIR/bench.log)"
timeout 90 python bench/cuda_copy_bench.py 2>&1 | tee "$LOG_DIR/bench.log"
exit "$test_rc"
