#!/usr/bin/env bash
# One call on a Hopper machine: the Gluon FP8 GEMM tests, then the benchmark beside its peers.
#   bench/kernels/gluon_fp8_on_device.sh [OUT_DIR]    (BENCH_ARGS passes options to the benchmark)
set -u
OUT=${1:-${OUT:-/tmp/gluon-fp8}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
start=$(date +%s)
timeout "${TEST_SECONDS:-200}" python3 -m pytest --noconftest -p no:cacheprovider -o addopts= -q -x \
  tests/gpu/test_fp8_gluon.py 2>&1 | tee "$OUT/tests.log" | tail -n 25
echo "TESTS took $(($(date +%s) - start)) s"
start=$(date +%s)
timeout "${BENCH_SECONDS:-300}" python3 bench/kernels/bench_fp8_gluon.py --out "$OUT/bench.json" ${BENCH_ARGS:-} \
  2>&1 | tee "$OUT/bench.log" | grep -E "GEMM|GEOMEAN|grouped|device|Error|ERROR|WRONG" | cut -c 1-400
echo "BENCH took $(($(date +%s) - start)) s"
