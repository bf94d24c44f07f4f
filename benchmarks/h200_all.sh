#!/usr/bin/env bash
# Everything that needs the H200, in one call (writes logs, JSON and a junit XML under $OUT):
#   plugin contract harness --gpu; the gpu tests (`python3 -m pytest -m gpu tests/gpu`: every
#   kernel against float64 references, graph replay, every family and scaled RoPE on the GPU
#   decoder and `run --device cuda` against the CPU reference); the per-kernel timings (routed fused
#   linear with its gemv1 / PDL-off option checks, many rows, the few-rows GEMV
#   against cuBLAS at the 7B decoder's site shapes, FP8 against bf16 weights in the fused GEMV at those
#   shapes (fp8_gemv.py), the decode-step kernels); the per-kernel profile
#   of a decode step (before/after the step kernels); the decode benchmark.
# Usage there: bash benchmarks/h200_all.sh [--no-harness] [--no-profile] [--no-checks] [--no-decode] [h200_decode.py args...]
#   --no-checks skips everything before the profile (harness, gpu tests, per-kernel timings);
#   --no-decode stops before the profile: the two halves fit one call each.
#   (carry .whl: Python 3.12 wheels of click, safetensors, regex and, where the machine lacks pytest,
#   pytest, pluggy, iniconfig, packaging; and plugins/harness/.trt_headers: `bash plugins/harness/run_gpu.sh --prepare`)
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
if python3 -c "import pytest" 2>/dev/null; then
  python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu --junitxml="$OUT/pytest_gpu.xml" > "$OUT/pytest_gpu.log" 2>&1; rc=$?
  grep -E "^(FAILED|ERROR) " "$OUT/pytest_gpu.log" | head -20; tail -1 "$OUT/pytest_gpu.log"
  echo "pytest -m gpu exit $rc"; [[ $rc == 0 ]] || status=1
else
  echo "pytest -m gpu: pytest is not installed here; carry its wheels in .whl/ (pytest, pluggy, iniconfig, packaging)"; status=1
fi
python3 benchmarks/gpu_kernels.py --skip drift,tswitch --out "$OUT/kernels" > "$OUT/gpu_kernels_lora.log" 2>&1; rc=$?
grep -E "correctness|f/d|x[0-9]+ +[0-9]+ +[0-9]+ \|" "$OUT/gpu_kernels_lora.log"; [[ $rc == 0 ]] || status=1
python3 benchmarks/lora_many_rows.py --out "$OUT" > "$OUT/lora_many_rows.log" 2>&1; rc=$?
tail -16 "$OUT/lora_many_rows.log"; [[ $rc == 0 ]] || status=1
python3 benchmarks/gemv_sites.py --out "$OUT" > "$OUT/gemv_sites.log" 2>&1; rc=$?
grep -E "rows|chain" "$OUT/gemv_sites.log" | grep -v "^ "; [[ $rc == 0 ]] || status=1
python3 benchmarks/fp8_gemv.py --out "$OUT" > "$OUT/fp8_gemv.log" 2>&1; rc=$?
grep -E "^(site|qkv|o |gate_up|down)" "$OUT/fp8_gemv.log"; [[ $rc == 0 ]] || status=1
python3 benchmarks/gpu_decode_ops.py --out "$OUT" > "$OUT/gpu_decode_ops.log" 2>&1; rc=$?
grep -E "kernel .* us|Error" "$OUT/gpu_decode_ops.log"; [[ $rc == 0 ]] || status=1
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
