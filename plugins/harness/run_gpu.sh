#!/usr/bin/env bash
# Build the plugin project and run the contract harness with --gpu (the IPluginV3 lifecycle
# replay), then with --gpu --check-expert-ids (the debug-mode expert_ids check).
#
# On the GPU machine (no network there):
#   bash plugins/harness/run_gpu.sh            # builds into $BUILD_DIR with the project's CMake, runs both
# TensorRT headers, first found wins:
#   TENSORRT_ROOT=/path/to/TensorRT            # an SDK with include/NvInfer.h
#   ADAFUSE_TRT_HEADERS_DIR=/path/with/NvInfer.h
#   plugins/harness/.trt_headers/...           # prepared beforehand on a machine with PyPI access:
#       bash plugins/harness/run_gpu.sh --prepare
#     (git-ignored: carry the path "plugins/harness/.trt_headers" to the GPU machine)
#   otherwise CMake tries to download the kernel-lens wheel (fails without network).
# Extra arguments go to the harness (e.g. --verbose). Exit status: 0 when both runs passed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
plugins="$(dirname "$here")"
headers_cache="$here/.trt_headers"
kl_include="$headers_cache/kernel_lens/include/tensorrt"

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p "$headers_cache"
  python3 -m pip download --no-deps --only-binary=:all: -q -d "$headers_cache" kernel-lens==2.0.1
  python3 -m zipfile -e "$headers_cache"/kernel_lens-2.0.1-*.whl "$headers_cache"
  test -f "$kl_include/NvInfer.h"
  echo "TensorRT headers ready in $kl_include"
  exit 0
fi

export PATH="/usr/local/cuda/bin:$PATH"
build="${BUILD_DIR:-/tmp/adafuse_plugins_gpu_build}"
args=(-DCMAKE_BUILD_TYPE=Release "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90}")
if [[ -n "${TENSORRT_ROOT:-}" ]]; then
  args+=("-DTENSORRT_ROOT=$TENSORRT_ROOT")
elif [[ -n "${ADAFUSE_TRT_HEADERS_DIR:-}" ]]; then
  args+=("-DADAFUSE_TRT_HEADERS_DIR=$ADAFUSE_TRT_HEADERS_DIR")
elif [[ -f "$kl_include/NvInfer.h" ]]; then
  args+=("-DADAFUSE_TRT_HEADERS_DIR=$kl_include")
fi
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null || true
nvcc --version | tail -n 2
# The project's one native build (the top-level CMakeLists.txt, preset gpu-harness: kernels, plugins, harness).
command -v cmake >/dev/null || { echo "cmake not found: the plugins build with the project's CMake (3.24 or newer)"; exit 2; }
cmake --preset gpu-harness -S "$(dirname "$plugins")" -B "$build" "${args[@]}"
cmake --build "$build" -j "$(nproc)" --target adafuse_trt_plugins adafuse_plugin_harness
build="$build/plugins"
# The lifecycle replay, then the debug-mode expert_ids check (a second process: the library
# reads ADAFUSE_CHECK_EXPERT_IDS once).
rc=0
"$build/adafuse_plugin_harness" --gpu --lib "$build/libadafuse_trt_plugins.so" "$@" || rc=$?
"$build/adafuse_plugin_harness" --gpu --check-expert-ids --lib "$build/libadafuse_trt_plugins.so" "$@" || rc=$?
exit "$rc"
