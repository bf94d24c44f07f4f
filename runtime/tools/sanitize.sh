#!/usr/bin/env bash
# The in-flight batching tests (the executor, the history backend, the service's Scheduler and its
# threads) built and run under AddressSanitizer + UndefinedBehaviorSanitizer, then ThreadSanitizer.
# CPU only, no CUDA: the sources these tests use are compiled straight with g++ (the library's other
# parts need nvcc and are covered by the fuzz harness in tests/CMakeLists.txt).
#   runtime/tools/sanitize.sh [asan|tsan|all|service]   (default all; builds under build/sanitize-*)
# service: the HTTP front (the test server in its --history mode: connection threads, client watches,
# streaming channels, the Scheduler) under ThreadSanitizer, driven by tests/test_service_front.py
# (cpp-httplib itself is the system's uninstrumented library).
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

# compile OUT FLAGS EXTRA_CFLAGS SOURCE...: every source (runtime/-relative) to OUT/*.o, two at a time, plus the
# one-line adafuse_sampling_default() (it lives in c_api.cpp, which drags in TensorRT and CUDA); the objects'
# paths are left in the array `objects`.
compile() {
  local out="$1" flags="$2" extra="$3"
  shift 3
  mkdir -p "$out"
  objects=()
  for s in "$@"; do
    local o="$out/$(echo "$s" | tr / _).o"
    # -O1 -g: line numbers in reports at a bearable speed
    g++ -std=c++17 -O1 -g -fno-omit-frame-pointer $flags -Wall -Wextra -Werror $extra "${includes[@]}" -c "$here/$s" -o "$o" &
    objects+=("$o")
    if (( $(jobs -rp | wc -l) >= 2 )); then wait -n; fi
  done
  wait
  printf '#include "adafuse/runtime.h"\nextern "C" adafuse_sampling adafuse_sampling_default(void) { return adafuse_sampling{0.0f, 0, 1.0f, 0}; }\n' \
    > "$out/sampling_default.cpp"
  g++ -std=c++17 $flags "${includes[@]}" -c "$out/sampling_default.cpp" -o "$out/sampling_default.o"
  objects+=("$out/sampling_default.o")
}

run_one() {
  local name="$1" flags="$2" env="$3"
  local out="$root/build/sanitize-$name"
  compile "$out" "$flags" "" "${sources[@]}"
  g++ $flags -o "$out/batching_tests" "${objects[@]}" -lgtest -lgtest_main -pthread
  echo "== $name: $out/batching_tests"
  env $env "$out/batching_tests" --gtest_brief=1
}

run_service() {
  local out="$root/build/sanitize-service" flags="-fsanitize=thread"
  local service_sources=(
    src/backend.cpp src/batcher.cpp src/generation.cpp src/sampling.cpp src/files.cpp src/safetensors.cpp
    service/scheduler.cpp service/metrics.cpp service/batching_metrics.cpp service/request.cpp service/completions.cpp
    service/bounded_server.cpp service/http_service.cpp
    tests/history_backend_for_tests.cpp tests/replay_backend_for_tests.cpp tests/replay_server_main.cpp
  )
  compile "$out" "$flags" "$(pkg-config --cflags cpp-httplib)" "${service_sources[@]}"
  mkdir -p "$out/tests"
  g++ $flags -o "$out/tests/adafuse_replay_server_for_tests" "${objects[@]}" $(pkg-config --libs cpp-httplib) -lcrypto -pthread
  rm -f "$out"/tsan.[0-9]*
  # The system's httplib is not instrumented: TSan sees its memcpy / memcmp (interceptors) but not its
  # synchronisation (a function-local static's inline guard check), so reads of httplib's own lazily
  # built statics from a second connection thread are reported. Those calls are left out; our code is not.
  printf 'called_from_lib:libcpp-httplib.so\n' > "$out/tsan.supp"
  echo "== service: $out/tests/adafuse_replay_server_for_tests under tests/test_service_front.py"
  (cd "$root" && TSAN_OPTIONS="log_path=$out/tsan:second_deadlock_stack=1:suppressions=$out/tsan.supp" ADAFUSE_TEST_SERVER="$out/tests/adafuse_replay_server_for_tests" \
    python3 -m pytest -q -p no:cacheprovider tests/test_service_front.py)
  if compgen -G "$out/tsan.[0-9]*" > /dev/null; then
    cat "$out"/tsan.[0-9]*
    echo "ThreadSanitizer reported (above)"
    return 1
  fi
}

if [[ "$which" == service ]]; then
  run_service
  echo "sanitizers: no report"
  exit 0
fi
if [[ "$which" == asan || "$which" == all ]]; then
  run_one asan "-fsanitize=address,undefined -fno-sanitize-recover=all" \
    "ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1"
fi
if [[ "$which" == tsan || "$which" == all ]]; then
  # --gtest_repeat: the Scheduler's thread interleavings differ from run to run
  run_one tsan "-fsanitize=thread" "TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 GTEST_REPEAT=5"
fi
echo "sanitizers: no report"
