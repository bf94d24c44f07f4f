#!/usr/bin/env bash
# The kernel library's GPU tests under compute-sanitizer (on the GPU machine): memcheck (out-of-bounds and misaligned
# accesses, hardware exceptions) and racecheck (shared-memory hazards), each over a subset of
# tests/gpu/test_gpu_{lora_linear,lora_linear_fp8,switch,switch_fp8,model_ops,decode_ops}.py that fits a few minutes
# (tests/gpu/conftest.py: ADAFUSE_GPU_CASE_MAX, the largest case size, default 4000000; ADAFUSE_GPU_CASE_EVERY, every
# n-th case of each test, default 4). Only the library's kernels are checked (--kernel-name kns=adafuse: its kernels
# live in namespace adafuse); PyTorch's, which compute the float64 references, run unchecked.
# First, per tool, a positive control (runtime/tools/sanitizer_control.cu: a planted out-of-bounds write, a planted
# race, in kernels named like the library's) must be reported under the same options, or the tool's run counts as
# failed: a tool, device or filter that checks nothing cannot pass.
#   OUT=<folder> bash runtime/tools/kernel_sanitizer.sh [memcheck|racecheck|all]   (default all)
# Needs ADAFUSE_KERNELS_LIB (benchmarks/h200_all.sh --sanitize sets it after runtime/tools/build_on_gpu.sh), else the
# tests build the library first. COMPUTE_SANITIZER: the tool's path [on PATH, else /usr/local/cuda/bin];
# SANITIZE_TIMEOUT: seconds per tool [200: both tools and the build fit one 10-minute device call; run one tool per
# call, `h200_all.sh --sanitize memcheck`, to give each more].
# Writes OUT/sanitizer_<tool>.log (pytest), OUT/sanitizer_<tool>.report (the sanitizer's), OUT/sanitizer_<tool>.xml
# (junit), OUT/sanitizer_control_<tool>.report, and OUT/sanitizer_summary.json; prints the summary. Exits non-zero
# when a control is not reported, the sanitizer reports an error, a test fails, or a tool runs out of time.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
which="${1:-all}"
case "$which" in
  memcheck|racecheck) tools=("$which") ;;
  all) tools=(memcheck racecheck) ;;
  *) echo "usage: kernel_sanitizer.sh [memcheck|racecheck|all] (found '$which')" >&2; exit 2 ;;
esac
SAN="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
[[ -x $SAN ]] || { echo "compute-sanitizer not found at $SAN (set COMPUTE_SANITIZER to its path)" >&2; exit 2; }
export ADAFUSE_GPU_CASE_MAX="${ADAFUSE_GPU_CASE_MAX:-4000000}" ADAFUSE_GPU_CASE_EVERY="${ADAFUSE_GPU_CASE_EVERY:-4}"
export PYTHONPATH="$root:${PYTHONPATH:-}"
TESTS=()  # the kernel tests; test_gpu_switch_fp8.py (FP8 bases in the switch) where the tree has it
for name in lora_linear lora_linear_fp8 switch switch_fp8 model_ops decode_ops; do
  [[ -f tests/gpu/test_gpu_$name.py ]] && TESTS+=("tests/gpu/test_gpu_$name.py")
done
ERROR_EXIT=86  # the sanitizer's exit code when it reports an error (--error-exitcode)
# --report-api-errors no: a failed CUDA call is the tests' to catch (the library checks every return code); PyTorch's
# probing calls (e.g. cuGetProcAddress of a symbol this driver lacks) would otherwise count as errors.
# PyTorch's caching allocator stays on (the tests capture CUDA graphs, which need it): memcheck sees its segments, not
# each tensor, so an access just past a tensor but inside its segment goes unseen; one outside any live allocation, a
# misaligned one, and shared or local memory out of bounds are seen.
options=(--error-exitcode "$ERROR_EXIT" --kernel-name kns=adafuse --target-processes application-only --print-limit 200
         --report-api-errors no)

control="$(mktemp -d)/sanitizer_control"
nvcc_bin="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
"$nvcc_bin" -arch=native -lineinfo -o "$control" runtime/tools/sanitizer_control.cu > "$OUT/sanitizer_control_build.log" 2>&1
control_built=$?

status=0
summary="$OUT/sanitizer_summary.tsv"
printf 'tool\tcontrol\tcontrol_rc\trc\tseconds\tsanitizer_summary\tpytest\n' > "$summary"
for tool in "${tools[@]}"; do
  planted=$([[ $tool == memcheck ]] && echo oob || echo race)
  control_rc=-1
  if [[ $control_built == 0 ]]; then
    "$SAN" --tool "$tool" "${options[@]}" --log-file "$OUT/sanitizer_control_$tool.report" "$control" "$planted" \
      > /dev/null 2>&1
    control_rc=$?
  fi
  control_seen=$([[ $control_rc == "$ERROR_EXIT" ]] && echo reported || echo "NOT REPORTED")
  start=$(date +%s)
  timeout "${SANITIZE_TIMEOUT:-200}" "$SAN" --tool "$tool" "${options[@]}" --log-file "$OUT/sanitizer_$tool.report" \
    python3 -m pytest -m gpu -q -p no:cacheprovider "${TESTS[@]}" --junitxml="$OUT/sanitizer_$tool.xml" \
    > "$OUT/sanitizer_$tool.log" 2>&1
  rc=$?
  seconds=$(( $(date +%s) - start ))
  san_line=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$OUT/sanitizer_$tool.report" 2>/dev/null | tail -1 | sed 's/^=* *//')
  pytest_line=$(tail -1 "$OUT/sanitizer_$tool.log" 2>/dev/null | sed 's/=//g; s/^ *//; s/ *$//')  # pytest's summary
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$control_seen" "$control_rc" "$rc" "$seconds" \
    "${san_line:-none (see the report)}" "${pytest_line:-none (see the log)}" >> "$summary"
  echo "$tool: control $control_seen (rc $control_rc); tests rc $rc in ${seconds} s; ${san_line:-no sanitizer summary}; ${pytest_line:-no pytest summary}"
  [[ $control_seen == reported && $rc == 0 ]] || status=1
  [[ $rc == 124 ]] && echo "$tool: ran past SANITIZE_TIMEOUT=${SANITIZE_TIMEOUT:-200} s (lower ADAFUSE_GPU_CASE_MAX or raise ADAFUSE_GPU_CASE_EVERY)"
  [[ $rc == "$ERROR_EXIT" ]] && grep -m 20 -E "^========= (Invalid|Error|Race|Warning|  )" "$OUT/sanitizer_$tool.report"
done
[[ $control_built == 0 ]] || { echo "the control did not build (see $OUT/sanitizer_control_build.log)"; status=1; }
python3 - "$summary" "$OUT/sanitizer_summary.json" "$status" <<'EOF'
import csv, json, os, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
subset = {k: os.environ[k] for k in ("ADAFUSE_GPU_CASE_MAX", "ADAFUSE_GPU_CASE_EVERY")}
json.dump({"passed": sys.argv[3] == "0", "subset": subset, "tools": rows}, open(sys.argv[2], "w"), indent=1)
EOF
rm -rf "$summary" "$(dirname "$control")"
echo "kernel sanitizer: $([[ $status == 0 ]] && echo PASS || echo FAIL) (summary in $OUT/sanitizer_summary.json)"
exit $status
