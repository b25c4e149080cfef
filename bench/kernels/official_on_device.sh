#!/usr/bin/env bash
# Build DeepGEMM (and try FlashMLA) from their PyPI sdists on a GPU machine without network, then
# check our adapters against the torch references and time every backend side by side.
#
#   bench/kernels/official_on_device.sh SDIST_DIR OUT_DIR [STEPS]
#
# SDIST_DIR holds deepinfer_gemm-*.tar.gz (or a DeepGEMM wheel built earlier) and either the SGLang
# FlashMLA fork's wheel (sgl_flash_mla-*.whl: FlashMLA's Hopper dense decode, prebuilt) or
# deepinfer_flashmla-*.tar.gz (1.0, which has none), and the elfutils headers
# DeepGEMM's build includes (libdw-dev and libelf-dev .debs; the device image lacks them: it loads
# libdw only at run time, for stack traces); docs/kernels.md says how to fetch them. STEPS (default "build test bench"; "mla" adds
# bench/kernels/bench_mla_gluon.py with MLA_ARGS) picks what runs. A wheel built earlier
# (SDIST_DIR/deep_gemm-*.whl) is installed instead of building again, and a DeepGEMM JIT cache
# (SDIST_DIR/deepgemm-jit.tgz) is restored, so that a second run spends no time compiling. The
# extension is compiled by `CXX`, the system g++ by default (an image's own g++ wrapper linked parts of
# libstdc++ into it, which crashed at the first call); docs/kernels.md records
# what each build did on the H200.
set -u
SDISTS=$(realpath "$1")
OUT=$(realpath "$2")
STEPS=${3:-build test bench}
REPO=$(pwd)
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
if [ -x /usr/bin/g++ ]; then export CXX=${CXX:-/usr/bin/g++} CC=${CC:-/usr/bin/gcc}; fi
export DG_JIT_CACHE_DIR=/tmp/deepgemm-jit PYTHONPATH=/tmp/site:$REPO
mkdir -p /tmp/site /tmp/wheels "$DG_JIT_CACHE_DIR" "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$CUDA_HOME/bin/nvcc" --version | tail -n 2
g++ --version | head -n 1
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
[ -f "$SDISTS/deepgemm-jit.tgz" ] && tar xzf "$SDISTS/deepgemm-jit.tgz" -C /tmp

if [[ $STEPS == *build* ]]; then
  if ls "$SDISTS"/deep*gemm-*.whl >/dev/null 2>&1; then
    cp "$SDISTS"/deep*gemm-*.whl /tmp/wheels/
  elif ls "$SDISTS"/deepinfer_gemm-*.tar.gz >/dev/null 2>&1; then
    start=$(date +%s)
    for deb in "$SDISTS"/*.deb; do dpkg -x "$deb" /tmp/elfutils; done
    export CPATH=/tmp/elfutils/usr/include
    mkdir -p /tmp/src && tar xzf "$SDISTS"/deepinfer_gemm-*.tar.gz -C /tmp/src
    (cd /tmp/src/deepinfer_gemm-* && DG_FORCE_BUILD=1 MAX_JOBS=16 timeout 420 \
      python3 -m pip wheel --no-deps --no-build-isolation --no-cache-dir -w /tmp/wheels . \
      >"$OUT/deepgemm-build.log" 2>&1)
    echo "DeepGEMM build rc=$? in $(($(date +%s) - start)) s"
    tail -n 5 "$OUT/deepgemm-build.log"
    cp /tmp/wheels/*.whl "$OUT/" 2>/dev/null
  fi
  if ls /tmp/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index --target /tmp/site /tmp/wheels/*.whl
  fi
  if ls "$SDISTS"/sgl_flash_mla-*.whl >/dev/null 2>&1; then
    # The SGLang fork's prebuilt wheel: its legacy extension keeps FlashMLA's Hopper dense decode.
    python3 -m pip install -q --no-deps --no-index --target /tmp/site "$SDISTS"/sgl_flash_mla-*.whl
    python3 -c 'import flash_mla; print("flash_mla", flash_mla.__version__, "legacy", flash_mla.has_legacy())'
  elif ls "$SDISTS"/deepinfer_flashmla-*.tar.gz >/dev/null 2>&1; then
    # FlashMLA: its setup.py checks the compiler first, so a failure shows at once.
    mkdir -p /tmp/src && tar xzf "$SDISTS"/deepinfer_flashmla-*.tar.gz -C /tmp/src
    (cd /tmp/src/deepinfer_flashmla-* && timeout 120 python3 -m pip wheel --no-deps --no-build-isolation \
      --no-cache-dir -w /tmp/wheels-flashmla . >"$OUT/flashmla-build.log" 2>&1)
    echo "FlashMLA build rc=$?"
    grep -m 3 -E "AssertionError|error:|Error" "$OUT/flashmla-build.log"
  fi
fi
python3 -c 'import deep_gemm; print("deep_gemm", deep_gemm.__version__, "imports")' 2>&1 | tail -n 1

if [[ $STEPS == *test* ]]; then
  start=$(date +%s)
  timeout 300 python3 -m pytest --noconftest -p no:cacheprovider -q -x -o addopts= \
    tests/gpu/test_kernels_official.py 2>&1 | tee "$OUT/tests.log" | tail -n 15
  echo "tests took $(($(date +%s) - start)) s"
  # `fireflyer kernels autotune` without the CLI's other imports (the device image lacks them)
  FIREFLYER_CACHE_DIR=/tmp/ff python3 -c 'import torch; from fireflyer.kernels import autotune, cli
print(cli.render_table(autotune.table_for(torch.device("cuda", 0), force=True)))' 2>&1 | tee "$OUT/autotune.txt"
fi
if [[ $STEPS == *bench* ]]; then
  timeout "${BENCH_SECONDS:-400}" python3 bench/kernels/bench_kernels.py ${BENCH_ARGS:-} \
    --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
fi
if [[ $STEPS == *mla* ]]; then
  # MLA decode: FlashMLA (when installed above) beside our kernels and the HBM copy rate.
  timeout "${BENCH_SECONDS:-400}" python3 bench/kernels/bench_mla_gluon.py ${MLA_ARGS:-} \
    --out "$OUT/bench_mla.json" 2>&1 | tee "$OUT/bench_mla.log" | grep -E "^(HBM|CHECK|MLA|FlashMLA)"
fi
tar czf "$OUT/deepgemm-jit.tgz" -C /tmp deepgemm-jit
