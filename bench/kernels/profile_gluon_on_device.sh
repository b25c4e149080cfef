#!/usr/bin/env bash
# One call on a Hopper GPU machine: Nsight Compute on one launch of each Gluon kernel where it
# misses its target (bench/kernels/profile_gluon.py), beside cuBLAS block-wise for the GEMM.
#
#   bench/kernels/profile_gluon_on_device.sh [OUT_DIR]
#
# Prints each kernel's speed-of-light, pipe and warp-stall figures; the reports go to OUT_DIR
# (default $OUT, else /tmp/gluon-profile). Clocks are left alone (--clock-control none).
set -u
OUT_DIR=$(realpath -m "${1:-${OUT:-/tmp/gluon-profile}}")
mkdir -p "$OUT_DIR"
# /tmp/site: where official_on_device.sh installs FlashMLA, for the FlashMLA cases.
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$(pwd)
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
METRICS=sm__throughput.avg.pct_of_peak_sustained_elapsed
METRICS+=,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed
METRICS+=,dram__throughput.avg.pct_of_peak_sustained_elapsed
METRICS+=,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active
METRICS+=,sm__inst_executed_pipe_tensor_op_gmma.sum
METRICS+=,smsp__average_warp_latency_issue_stalled_barrier.ratio
METRICS+=,smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio
METRICS+=,smsp__average_warp_latency_issue_stalled_wait.ratio
METRICS+=,smsp__average_warp_latency_issue_stalled_math_pipe_throttle.ratio
METRICS+=,smsp__average_warp_latency_issue_stalled_membar.ratio
METRICS+=,smsp__average_warp_latency_issue_stalled_sleeping.ratio
METRICS+=,smsp__average_warp_latency_issue_stalled_dispatch_stall.ratio
METRICS+=,smsp__issue_active.avg.pct_of_peak_sustained_active
METRICS+=,lts__t_throughput.avg.pct_of_peak_sustained_elapsed
METRICS+=,l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed
METRICS+=,smsp__average_warp_latency_issue_stalled_short_scoreboard.ratio
METRICS+=,smsp__average_warp_latency_issue_stalled_mio_throttle.ratio
METRICS+=,smsp__average_warp_latency_issue_stalled_lg_throttle.ratio
METRICS+=,smsp__cycles_active.avg
METRICS+=,launch__registers_per_thread,launch__grid_size,launch__block_size,gpu__time_duration.sum
# Shared-memory bank traffic and the instruction count: kept only where this ncu knows the
# metric, so a missing one does not fail the whole run.
KNOWN=$("$NCU" --query-metrics 2>/dev/null)
for optional in l1tex__data_bank_reads l1tex__data_bank_writes smsp__inst_executed; do
  if grep -q "^$optional " <<<"$KNOWN"; then
    if [ "$optional" = smsp__inst_executed ]; then METRICS+=,$optional.sum
    else METRICS+=,$optional.avg.pct_of_peak_sustained_elapsed; fi
  else echo "ncu lacks $optional: not measured"; fi
done
for case in ${CASES:-mla_compute gemm_gluon_4096 gemm_cublas_4096 mla_memory_4k}; do
  start=$(date +%s)
  timeout 60 "$NCU" --clock-control none --nvtx --nvtx-include "profile/" --metrics "$METRICS" \
    --csv --page raw python3 bench/kernels/profile_gluon.py --case "$case" \
    >"$OUT_DIR/$case.csv" 2>"$OUT_DIR/$case.err"
  echo "PROFILE $case rc=$? in $(($(date +%s) - start)) s"
  python3 - "$OUT_DIR/$case.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
head = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if head is None:
    print("  no kernel rows"); sys.exit()
names = rows[head]
for r in rows[head + 2:]:
    rec = dict(zip(names, r))
    print("  kernel", rec.get("Kernel Name", "?")[:60])
    for k in names:
        if "__" in k:
            print(f"    {k} = {rec.get(k)}")
PY
  tail -n 3 "$OUT_DIR/$case.err"
done
