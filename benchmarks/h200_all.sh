#!/usr/bin/env bash
# Everything that needs the H200, in one call (writes logs and JSON under $OUT):
#   plugin contract harness --gpu, `run --device cuda` vs the CPU reference, every family and scaled
#   RoPE on the GPU decoder against the CPU reference (gpu_families.py), the decode-step
#   kernels' correctness sweep and timings, the per-kernel profile of a decode step (before/after
#   the step kernels), the decode benchmark.
#   the routed fused linear's sweep and per-shape timings (gpu_kernels.py without the switch parts),
#   the few-rows GEMV against cuBLAS at the 7B decoder's site shapes (gemv_sites.py),
# Usage there: bash benchmarks/h200_all.sh [--no-harness] [--no-profile] [--no-checks] [--no-decode] [h200_decode.py args...]
#   --no-checks skips everything before the profile (harness, run --device cuda, kernel sweeps and
#   per-kernel timings); --no-decode stops before the profile: the two halves fit one call each.
#   (carry .whl and plugins/harness/.trt_headers)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
status=0
has() { [[ " $ARGS " == *" $1 "* ]]; }
ARGS="$*"
if ! has --no-checks; then
if ! has --no-harness; then
  bash plugins/harness/run_gpu.sh > "$OUT/plugin_harness.log" 2>&1; rc=$?; tail -5 "$OUT/plugin_harness.log"
  echo "plugin harness exit $rc"; [[ $rc == 0 ]] || status=1
fi
ex=$(mktemp -d)/ex
python3 -m adafuse_export make-example "$ex" >/dev/null
cpu=$(python3 -m adafuse_export run "$ex" --prompt-ids 3,1,4,1,5 --max-new-tokens 12 2>/dev/null)
for s in fused switch auto; do
  gpu=$(python3 -m adafuse_export run "$ex" --prompt-ids 3,1,4,1,5 --max-new-tokens 12 --device cuda --strategy $s 2>>"$OUT/run_cuda.log")
  echo "run --device cuda --strategy $s: $gpu | cpu reference: $cpu | $([[ "$gpu" == "$cpu" ]] && echo SAME || echo DIFFERENT)" | tee -a "$OUT/run_cuda.log"
  [[ "$gpu" == "$cpu" ]] || status=1
done
python3 benchmarks/gpu_families.py --out "$OUT" > "$OUT/gpu_families.log" 2>&1; rc=$?
tail -1 "$OUT/gpu_families.log"; [[ $rc == 0 ]] || status=1
python3 benchmarks/gpu_kernels.py --skip switch,drift,tswitch --out "$OUT/kernels" > "$OUT/gpu_kernels_lora.log" 2>&1; rc=$?
grep -E "correctness|f/d|x[0-9]+ +[0-9]+ +[0-9]+ \|" "$OUT/gpu_kernels_lora.log"; [[ $rc == 0 ]] || status=1
python3 benchmarks/lora_many_rows.py --out "$OUT" > "$OUT/lora_many_rows.log" 2>&1; rc=$?
tail -16 "$OUT/lora_many_rows.log"; [[ $rc == 0 ]] || status=1
python3 benchmarks/gemv_sites.py --out "$OUT" > "$OUT/gemv_sites.log" 2>&1; rc=$?
grep -E "rows|chain" "$OUT/gemv_sites.log" | grep -v "^ "; [[ $rc == 0 ]] || status=1
python3 benchmarks/gpu_decode_ops.py --out "$OUT" > "$OUT/gpu_decode_ops.log" 2>&1; rc=$?
grep -E "cases|correctness|kernel .* us" "$OUT/gpu_decode_ops.log"; [[ $rc == 0 ]] || status=1
fi
has --no-decode && exit $status
if ! has --no-profile; then
  python3 benchmarks/profile_decode_step.py --out "$OUT" > "$OUT/profile_decode_step.log" 2>&1 || status=1
  grep "==" "$OUT/profile_decode_step.log"
fi
args=(); for a in "$@"; do [[ $a == --no-harness || $a == --no-profile || $a == --no-checks || $a == --no-decode ]] || args+=("$a"); done
python3 benchmarks/h200_decode.py --out "$OUT" "${args[@]}" 2>&1 | tee "$OUT/h200_decode.log"; rc=${PIPESTATUS[0]}
[[ $rc == 0 ]] || status=1
exit $status
