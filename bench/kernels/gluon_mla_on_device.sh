#!/usr/bin/env bash
# One call on a Hopper GPU machine: the Gluon MLA decode kernel's GPU tests, then its benchmark
# beside the Triton kernel and the HBM copy rate (bench/kernels/bench_mla_gluon.py).
#
#   bench/kernels/gluon_mla_on_device.sh [OUT_DIR]
#
# Prints a compact summary; full logs and bench.json go to OUT_DIR (default $OUT, else /tmp/gluon-mla).
# BENCH_ARGS (e.g. --quick) is passed to the benchmark; the whole run stays under 6 minutes.
# LENGTHS=1 adds the Triton kernel's balanced-runs tests and bench/kernels/bench_mla_lengths.py
# (unequal lengths, uniform splits against balanced runs): about 3 minutes more.
set -u
OUT_DIR=$(realpath -m "${1:-${OUT:-/tmp/gluon-mla}}")
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

start=$(date +%s)
timeout 150 python3 -m pytest --noconftest -p no:cacheprovider -o addopts= -q -x \
  tests/gpu/test_mla_gluon.py >"$OUT_DIR/tests.log" 2>&1
echo "TESTS rc=$? in $(($(date +%s) - start)) s: $(tail -n 1 "$OUT_DIR/tests.log")"
grep -E "^(FAILED|ERROR|E  )" "$OUT_DIR/tests.log" | head -n 20

start=$(date +%s)
timeout 190 python3 bench/kernels/bench_mla_gluon.py ${BENCH_ARGS:-} --out "$OUT_DIR/bench.json" \
  >"$OUT_DIR/bench.log" 2>&1
echo "BENCH rc=$? in $(($(date +%s) - start)) s"
grep -E "^(HBM|CHECK|MLA)" "$OUT_DIR/bench.log"
grep -E "Error|error" "$OUT_DIR/bench.log" | head -n 10

if [ -n "${LENGTHS:-}" ]; then
  start=$(date +%s)
  timeout 60 python3 -m pytest --noconftest -p no:cacheprovider -o addopts= -q -k balanced \
    tests/gpu/test_kernels_gpu.py >"$OUT_DIR/tests_balanced.log" 2>&1
  echo "TESTS balanced rc=$?: $(tail -n 1 "$OUT_DIR/tests_balanced.log")"
  timeout 150 python3 bench/kernels/bench_mla_lengths.py --out "$OUT_DIR/lengths.json" \
    >"$OUT_DIR/lengths.log" 2>&1
  echo "LENGTHS rc=$? in $(($(date +%s) - start)) s"
  grep -E "^(HBM|LENGTHS)" "$OUT_DIR/lengths.log"
  grep -E "Error|error" "$OUT_DIR/lengths.log" | head -n 10
fi
