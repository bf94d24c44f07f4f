#!/usr/bin/env bash
# Everything that needs the H200, in one call (writes logs, JSON and a junit XML under $OUT):
#   plugin contract harness --gpu; the gpu tests (`python3 -m pytest -m gpu tests/gpu`: every
#   kernel against float64 references, graph replay, every kind, family and scaled RoPE on the native
#   backend, `run --device cuda` and `validate --runtime cpp` against the CPU reference); the per-kernel
#   timings (routed fused linear with its gemv1 / PDL-off option checks, many rows, the few-rows GEMV
#   against cuBLAS at the 7B decoder's site shapes, FP8 against bf16 weights in the fused GEMV at those
#   shapes (fp8_gemv.py), the decode-step kernels, the native step's time per kernel at each batch and of a
#   512-token prefill (profile_native.py), the fused switch against copy bandwidth (switch_bound.py)); the decode
#   benchmark of
#   the native backend over the C API (benchmarks/h200_decode.py).
# First it builds the kernels, the runtime (native backend), adafuse-serve and adafuse-generate for this GPU
# (runtime/tools/build_on_gpu.sh; ADAFUSE_DEVICE_DEPS: the header folder it needs) and exports ADAFUSE_RUNTIME_LIB
# and ADAFUSE_KERNELS_LIB for everything after it; an ADAFUSE_RUNTIME_LIB already set skips the build.
# Usage there: bash benchmarks/h200_all.sh [--no-harness] [--no-checks] [--no-decode] [h200_decode.py args...]
#   --no-checks skips everything before the decode benchmark (harness, gpu tests, per-kernel timings);
#   --no-decode stops before it: the two halves fit one call each.
#   (carry .whl: Python 3.12 wheels of click, safetensors, regex and, where the machine lacks pytest,
#   pytest, pluggy, iniconfig, packaging; .device_deps (runtime/tools/build_on_gpu.sh says what it holds); and
#   plugins/harness/.trt_headers: `bash plugins/harness/run_gpu.sh --prepare`)
# Or: bash benchmarks/h200_all.sh --serve-load [serve_load.py args...]: only the serving load benchmark
#   (runtime/tools/build_on_gpu.sh, then benchmarks/serve_load.py into $OUT/serve_load.json; one call).
# Or: bash benchmarks/h200_all.sh --sanitize [memcheck|racecheck]: only the kernel tests under compute-sanitizer
#   (runtime/tools/kernel_sanitizer.sh: both tools by default, logs and sanitizer_summary.json in $OUT; one call).
# After the decode benchmark, benchmarks/decode_targets.py judges issue 23's targets from $OUT (into native_backend.json),
#   with the checks half's profile_native.json, gemv_sites.json, fp8_gemv.json and switch_bound.json
#   where they are in $OUT; when the halves ran in separate calls, put their files in one folder
#   and run `python3 benchmarks/decode_targets.py FOLDER` there (CPU only).
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
if [[ -z ${ADAFUSE_RUNTIME_LIB:-} ]]; then
  JOBS=${JOBS:-$(nproc)} bash runtime/tools/build_on_gpu.sh > "$OUT/build_on_gpu.log" 2>&1 || {
    tail -5 "$OUT/build_on_gpu.log"; echo "build_on_gpu.sh failed"; exit 1; }
  export ADAFUSE_RUNTIME_LIB="$PWD/build/gpu-native/runtime/libadafuse_runtime.so"
  export ADAFUSE_KERNELS_LIB="${ADAFUSE_KERNELS_LIB:-$PWD/build/gpu-native/plugins/kernels/libadafuse_kernels.so}"
fi
if has --serve-load; then
  args=(); for a in "$@"; do [[ $a == --serve-load ]] || args+=("$a"); done
  python3 benchmarks/serve_load.py --out "$OUT/serve_load.json" "${args[@]}" 2>&1 | tee "$OUT/serve_load.log"
  exit "${PIPESTATUS[0]}"
fi
if has --sanitize; then
  tool=all; for a in "$@"; do [[ $a == memcheck || $a == racecheck ]] && tool=$a; done
  OUT="$OUT" bash runtime/tools/kernel_sanitizer.sh "$tool" 2>&1 | tee "$OUT/kernel_sanitizer.log"
  exit "${PIPESTATUS[0]}"
fi
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
python3 benchmarks/profile_native.py --out "$OUT" --dense > "$OUT/profile_native.log" 2>&1; rc=$?
grep -E "GPU span" "$OUT/profile_native.log"; [[ $rc == 0 ]] || status=1
python3 benchmarks/switch_bound.py --out "$OUT" > "$OUT/switch_bound.run.log" 2>&1; rc=$?  # decode_targets' switch target
grep -E "^r(16|64) (pristine|in place) +[0-9]+ \|" "$OUT/switch_bound.run.log"; [[ $rc == 0 ]] || status=1
fi
has --no-decode && exit $status
args=(); for a in "$@"; do [[ $a == --no-harness || $a == --no-checks || $a == --no-decode ]] || args+=("$a"); done
python3 benchmarks/h200_decode.py --out "$OUT" "${args[@]}" 2>&1 | tee "$OUT/h200_decode.log"; rc=${PIPESTATUS[0]}
[[ $rc == 0 ]] || status=1
if [[ -f $OUT/native_backend.json ]]; then
  python3 benchmarks/decode_targets.py "$OUT" 2>&1 | tee "$OUT/decode_targets.log"; [[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi
exit $status
