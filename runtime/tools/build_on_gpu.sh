#!/usr/bin/env bash
# Builds the kernels, the runtime with its native backend, adafuse-generate and adafuse-serve on the GPU
# machine (CMake preset gpu-native: sm_90, no tests, no plugins). That machine has nvcc, cmake and ninja but
# no -dev packages and no network: the header-only dependencies come in one folder,
#   $ADAFUSE_DEVICE_DEPS (default .device_deps/include): nlohmann/json.hpp, httplib.h (single-file, header-only:
#   a split build's header leaves adafuse-serve out), openssl/ and tensorrt/NvInfer.h ... (TensorRT's headers,
#   e.g. build/dev/_trt_headers/kernel_lens/include/tensorrt of a machine that configured the dev preset),
# and the system's libcrypto.so.3 is linked (found through ldconfig, or OPENSSL_CRYPTO_LIBRARY=...).
# Where the toolkit has cublasLt.h, tools/cublaslt_api_check.cpp checks the runtime's cuBLASLt declarations against it.
# Prints the library's path for ADAFUSE_RUNTIME_LIB at the end.
#   runtime/tools/build_on_gpu.sh [extra cmake -D arguments]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
deps=${ADAFUSE_DEVICE_DEPS:-$root/.device_deps/include}
build=$root/build/gpu-native
args=(--preset gpu-native -S "$root")
if [[ -d $deps ]]; then
  args+=("-DADAFUSE_THIRD_PARTY_INCLUDE=$deps")
  [[ -f $deps/tensorrt/NvInfer.h ]] && args+=("-DADAFUSE_TRT_HEADERS_DIR=$deps/tensorrt")
else
  echo "build_on_gpu.sh: no $deps (set ADAFUSE_DEVICE_DEPS); relying on the system's headers" >&2
fi
crypto=${OPENSSL_CRYPTO_LIBRARY:-$(ldconfig -p 2>/dev/null | awk '/libcrypto\.so\.3 .*x86-64/ {print $NF; exit}')}
[[ -n $crypto ]] && args+=("-DOPENSSL_CRYPTO_LIBRARY=$crypto")
if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then export PATH=/usr/local/cuda/bin:$PATH; fi

cmake "${args[@]}" "$@"
cmake --build "$build" -j "${JOBS:-$(nproc)}"
python3 - "$build/build_info.json" <<'PY'
import json, sys
info = json.load(open(sys.argv[1]))
print("built:", ", ".join(info["built"]) or "-")
for reason in info["left_out"]:
    print("left out:", reason)
if "cublaslt-api-check" not in info["built"]:  # runtime/CMakeLists.txt: needs the toolkit's cublasLt.h
    print("not checked: src/cublaslt_api.h against cublasLt.h (none in this toolkit's include folder)")
sys.exit(0 if "runtime" in info["built"] else 1)
PY
echo "ADAFUSE_RUNTIME_LIB=$build/runtime/libadafuse_runtime.so"
