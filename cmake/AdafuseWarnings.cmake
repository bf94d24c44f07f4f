# AdafuseWarnings.cmake - the warning flags of every adafuse C++/CUDA target
# (included by plugins/CMakeLists.txt and plugins/kernels/CMakeLists.txt).
# Warnings are errors by default, so CI fails on any new warning;
# -DADAFUSE_WERROR=OFF keeps them warnings for local experiments.
# CUDA: host code through -Xcompiler, nvcc's own diagnostics through -Werror all-warnings.
option(ADAFUSE_WERROR "Treat compiler warnings as errors" ON)
set(_adafuse_cxx_warnings -Wall -Wextra)
set(_adafuse_cuda_warnings -Xcompiler=-Wall,-Wextra)
if(ADAFUSE_WERROR)
  list(APPEND _adafuse_cxx_warnings -Werror)
  list(APPEND _adafuse_cuda_warnings -Xcompiler=-Werror "SHELL:-Werror all-warnings")
endif()
set(ADAFUSE_WARNINGS
  "$<$<COMPILE_LANGUAGE:CXX>:${_adafuse_cxx_warnings}>"
  "$<$<COMPILE_LANGUAGE:CUDA>:${_adafuse_cuda_warnings}>")
