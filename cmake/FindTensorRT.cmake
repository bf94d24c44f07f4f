# FindTensorRT.cmake - locate the TensorRT C++ headers (and, if present, libnvinfer).
#
# The plugins only need the headers: they implement TensorRT's pure-virtual
# plugin interfaces and are loaded by TensorRT at run time, so nothing from
# libnvinfer is linked. Search order:
#   1. TENSORRT_ROOT (CMake variable or environment variable): <root>/include
#   2. ADAFUSE_TRT_HEADERS_DIR: a folder that holds NvInfer.h directly
#   3. the system (/usr/include, /usr/include/<arch>-linux-gnu, /usr/local/tensorrt/include)
#   4. only if ADAFUSE_DOWNLOAD_TRT_HEADERS is ON (the default): download the
#      PyPI wheel kernel-lens==2.0.1 (235 kB, Apache-2.0 NVIDIA TensorRT 10.14.1
#      headers under kernel_lens/include/tensorrt/) with
#      `python -m pip download --no-deps` into <build>/_trt_headers and use the
#      extracted headers. Pass -DADAFUSE_DOWNLOAD_TRT_HEADERS=OFF to forbid
#      the download (then steps 1-3 must succeed).
#
# Defines: TensorRT_FOUND, TensorRT_INCLUDE_DIR, TensorRT_VERSION, TensorRT_DOWNLOAD_ERROR (why step 4 failed),
#          TensorRT_HEADERS_SOURCE (root|dir|system|kernel-lens),
#          target TensorRT::headers (INTERFACE).
# A user's own TensorRT SDK always takes precedence over the downloaded headers.

set(TENSORRT_ROOT "$ENV{TENSORRT_ROOT}" CACHE PATH "TensorRT SDK root (with include/NvInfer.h)")
set(ADAFUSE_TRT_HEADERS_DIR "" CACHE PATH "Folder that directly holds NvInfer.h (alternative to TENSORRT_ROOT)")
option(ADAFUSE_DOWNLOAD_TRT_HEADERS "Download the kernel-lens wheel from PyPI for TensorRT headers when none are found" ON)
set(ADAFUSE_KERNEL_LENS_SPEC "kernel-lens==2.0.1" CACHE STRING "pip requirement of the wheel that ships TensorRT headers")

set(_trt_source "")
if(TENSORRT_ROOT)
  find_path(TensorRT_INCLUDE_DIR NvInfer.h PATHS "${TENSORRT_ROOT}/include" "${TENSORRT_ROOT}" NO_DEFAULT_PATH)
  if(TensorRT_INCLUDE_DIR)
    set(_trt_source "root")
  else()
    message(FATAL_ERROR "FindTensorRT: TENSORRT_ROOT=${TENSORRT_ROOT} has no include/NvInfer.h")
  endif()
endif()
if(NOT TensorRT_INCLUDE_DIR AND ADAFUSE_TRT_HEADERS_DIR)
  find_path(TensorRT_INCLUDE_DIR NvInfer.h PATHS "${ADAFUSE_TRT_HEADERS_DIR}" NO_DEFAULT_PATH)
  if(TensorRT_INCLUDE_DIR)
    set(_trt_source "dir")
  else()
    message(FATAL_ERROR "FindTensorRT: ADAFUSE_TRT_HEADERS_DIR=${ADAFUSE_TRT_HEADERS_DIR} has no NvInfer.h")
  endif()
endif()
if(NOT TensorRT_INCLUDE_DIR)
  find_path(TensorRT_INCLUDE_DIR NvInfer.h
    PATHS /usr/include /usr/include/${CMAKE_LIBRARY_ARCHITECTURE} /usr/local/tensorrt/include /opt/tensorrt/include)
  if(TensorRT_INCLUDE_DIR)
    set(_trt_source "system")
  endif()
endif()

if(NOT TensorRT_INCLUDE_DIR AND ADAFUSE_DOWNLOAD_TRT_HEADERS)
  set(_kl_dir "${CMAKE_BINARY_DIR}/_trt_headers")
  set(_kl_inc "${_kl_dir}/kernel_lens/include/tensorrt")
  if(NOT EXISTS "${_kl_inc}/NvInfer.h")
    find_package(Python3 COMPONENTS Interpreter REQUIRED)
    message(STATUS "FindTensorRT: downloading ${ADAFUSE_KERNEL_LENS_SPEC} (TensorRT headers) into ${_kl_dir}")
    file(MAKE_DIRECTORY "${_kl_dir}")
    execute_process(
      # pip's build isolation (a `pip install` of this project) hides the interpreter's own pip through
      # PYTHONPATH; the download needs that pip, not the isolated environment.
      COMMAND "${CMAKE_COMMAND}" -E env --unset=PYTHONPATH --unset=PYTHONNOUSERSITE
              "${Python3_EXECUTABLE}" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check
              -q -d "${_kl_dir}" "${ADAFUSE_KERNEL_LENS_SPEC}"
      RESULT_VARIABLE _kl_rc OUTPUT_VARIABLE _kl_out ERROR_VARIABLE _kl_err)
    file(GLOB _kl_wheels "${_kl_dir}/kernel_lens-*.whl")
    if(NOT _kl_rc EQUAL 0 OR NOT _kl_wheels)
      set(_kl_failure "pip download of ${ADAFUSE_KERNEL_LENS_SPEC} failed (${_kl_rc}): ${_kl_err}")
    else()
      list(GET _kl_wheels 0 _kl_wheel)
      execute_process(COMMAND "${CMAKE_COMMAND}" -E tar xf "${_kl_wheel}" WORKING_DIRECTORY "${_kl_dir}"
                      RESULT_VARIABLE _kl_rc)
      if(NOT _kl_rc EQUAL 0 OR NOT EXISTS "${_kl_inc}/NvInfer.h")
        set(_kl_failure "${_kl_wheel} did not hold kernel_lens/include/tensorrt/NvInfer.h")
      endif()
    endif()
  endif()
  if(_kl_failure)
    # Not fatal unless REQUIRED: the caller decides what to leave out without TensorRT headers.
    set(TensorRT_DOWNLOAD_ERROR "${_kl_failure}")
    message(STATUS "FindTensorRT: ${_kl_failure}")
  else()
    set(TensorRT_INCLUDE_DIR "${_kl_inc}" CACHE PATH "TensorRT include folder" FORCE)
    set(_trt_source "kernel-lens")
  endif()
endif()

if(TensorRT_INCLUDE_DIR AND EXISTS "${TensorRT_INCLUDE_DIR}/NvInferVersion.h")
  file(READ "${TensorRT_INCLUDE_DIR}/NvInferVersion.h" _trt_ver_h)
  foreach(_part MAJOR MINOR PATCH)
    # TensorRT >= 10.11 defines NV_TENSORRT_MAJOR via TRT_MAJOR_ENTERPRISE; older ones directly.
    string(REGEX MATCH "#define (TRT_${_part}_ENTERPRISE|NV_TENSORRT_${_part}) +([0-9]+)" _m "${_trt_ver_h}")
    set(_trt_${_part} "${CMAKE_MATCH_2}")
  endforeach()
  set(TensorRT_VERSION "${_trt_MAJOR}.${_trt_MINOR}.${_trt_PATCH}")
endif()
set(TensorRT_HEADERS_SOURCE "${_trt_source}")

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(TensorRT
  REQUIRED_VARS TensorRT_INCLUDE_DIR
  VERSION_VAR TensorRT_VERSION
  FAIL_MESSAGE "TensorRT headers not found: set TENSORRT_ROOT, ADAFUSE_TRT_HEADERS_DIR, or enable ADAFUSE_DOWNLOAD_TRT_HEADERS")

if(TensorRT_FOUND AND NOT TARGET TensorRT::headers)
  add_library(TensorRT::headers INTERFACE IMPORTED)
  set_target_properties(TensorRT::headers PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${TensorRT_INCLUDE_DIR}")
  message(STATUS "FindTensorRT: TensorRT ${TensorRT_VERSION} headers from ${TensorRT_HEADERS_SOURCE}: ${TensorRT_INCLUDE_DIR}")
endif()
