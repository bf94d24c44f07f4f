#!/usr/bin/env bash
# The in-flight batching tests (the executor, the history backend, the service's Scheduler and its
# threads) built and run under AddressSanitizer + UndefinedBehaviorSanitizer, then ThreadSanitizer.
# CPU only, no CUDA: the sources these tests use are compiled straight with g++ (the library's other
# parts need nvcc and are covered by the fuzz harness in tests/CMakeLists.txt).
#   runtime/tools/sanitize.sh [asan|tsan|all]   (default all; builds under build/sanitize-*)
# Exits non-zero on the first sanitizer report or test failure.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
root="$(cd "$here/.." && pwd)"
which="${1:-all}"
sources=(
  src/backend.cpp src/batcher.cpp src/generation.cpp src/sampling.cpp
  service/scheduler.cpp service/metrics.cpp service/batching_metrics.cpp
  tests/history_backend_for_tests.cpp tests/test_history_backend.cpp tests/test_batcher.cpp tests/test_scheduler.cpp
)
includes=(-I"$here/include" -I"$here/src" -I"$here/service" -I"$here/tests")

run_one() {
  local name="$1" flags="$2" env="$3"
  local out="$root/build/sanitize-$name"
  mkdir -p "$out"
  local objects=()
  for s in "${sources[@]}"; do
    local o="$out/$(echo "$s" | tr / _).o"
    # -O1 -g: line numbers in reports at a bearable speed
    g++ -std=c++17 -O1 -g -fno-omit-frame-pointer $flags -Wall -Wextra -Werror "${includes[@]}" -c "$here/$s" -o "$o" &
    objects+=("$o")
    if (( $(jobs -rp | wc -l) >= 2 )); then wait -n; fi
  done
  wait
  # adafuse_sampling_default() lives in c_api.cpp, which drags in TensorRT and CUDA: its one line here
  printf '#include "adafuse/runtime.h"\nextern "C" adafuse_sampling adafuse_sampling_default(void) { return adafuse_sampling{0.0f, 0, 1.0f, 0}; }\n' \
    > "$out/sampling_default.cpp"
  g++ -std=c++17 $flags "${includes[@]}" -c "$out/sampling_default.cpp" -o "$out/sampling_default.o"
  objects+=("$out/sampling_default.o")
  g++ $flags -o "$out/batching_tests" "${objects[@]}" -lgtest -lgtest_main -pthread
  echo "== $name: $out/batching_tests"
  env $env "$out/batching_tests" --gtest_brief=1
}

if [[ "$which" == asan || "$which" == all ]]; then
  run_one asan "-fsanitize=address,undefined -fno-sanitize-recover=all" \
    "ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1"
fi
if [[ "$which" == tsan || "$which" == all ]]; then
  # --gtest_repeat: the Scheduler's thread interleavings differ from run to run
  run_one tsan "-fsanitize=thread" "TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 GTEST_REPEAT=5"
fi
echo "sanitizers: no report"
