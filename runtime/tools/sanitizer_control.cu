// The positive control of runtime/tools/kernel_sanitizer.sh: a planted out-of-bounds write (memcheck) and a planted
// shared-memory race (racecheck) in kernels named like the library's (namespace adafuse, an anonymous namespace
// inside), run under the same compute-sanitizer options as the kernel tests. Each tool must report its planted error:
// a tool, device or kernel filter that checks nothing fails there instead of passing the tests vacuously.
//   sanitizer_control oob|race      (exit 0 when the kernel ran; the sanitizer's exit code says what it saw)
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

namespace adafuse {
namespace {

constexpr int kElements = 256;

// Thread kElements writes out[kElements], one element past the allocation.
__global__ void control_out_of_bounds_kernel(int* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = i;
}

// Two warps write the same shared words and read their neighbours' without a barrier.
__global__ void control_shared_race_kernel(int* out) {
  __shared__ int words[32];
  words[threadIdx.x % 32] = static_cast<int>(threadIdx.x);
  out[threadIdx.x] = words[(threadIdx.x + 1) % 32];
}

}  // namespace
}  // namespace adafuse

int check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return 0;
  std::fprintf(stderr, "sanitizer_control: %s: %s\n", what, cudaGetErrorString(status));
  return 1;
}

int main(int argc, char** argv) {
  const bool oob = argc == 2 && std::strcmp(argv[1], "oob") == 0, race = argc == 2 && std::strcmp(argv[1], "race") == 0;
  if (!oob && !race) {
    std::fprintf(stderr, "usage: sanitizer_control oob|race\n");
    return 2;
  }
  int* out = nullptr;
  if (check(cudaMalloc(&out, adafuse::kElements * sizeof(int)), "cudaMalloc")) return 1;
  if (oob) adafuse::control_out_of_bounds_kernel<<<2, adafuse::kElements / 2 + 1>>>(out, adafuse::kElements);
  else adafuse::control_shared_race_kernel<<<1, 64>>>(out);
  if (check(cudaGetLastError(), "launch") || check(cudaDeviceSynchronize(), "synchronize")) return 1;
  if (check(cudaFree(out), "cudaFree")) return 1;
  std::printf("sanitizer_control %s: ran\n", argv[1]);
  return 0;
}
