// TensorRT opened at run time: absent, too old, not TensorRT; plugin libraries with and without
// the entry points IPluginRegistry::loadLibrary needs.
#include <dlfcn.h>

#include "tensorrt_library.h"
#include "test_util.h"

namespace adafuse::testing {
namespace {

TEST(TensorRTLibrary, SaysWhatItLookedForWhenAbsent) {
  if (void* h = dlopen("libnvinfer.so.10", RTLD_LAZY)) {
    dlclose(h);
    GTEST_SKIP() << "TensorRT is installed here";
  }
  expect_error_containing([] { open_tensorrt(""); }, ADAFUSE_ERR_TENSORRT,
                          "TensorRT not found: this runtime needs TensorRT 10.x (tried libnvinfer.so.10, libnvinfer.so: ");
  expect_error_containing([] { open_tensorrt("/nonexistent/libnvinfer.so.10"); }, ADAFUSE_ERR_TENSORRT,
                          "TensorRT not found: this runtime needs TensorRT 10.x (tried /nonexistent/libnvinfer.so.10: ");
}

TEST(TensorRTLibrary, RefusesAnOldTensorRT) {
  expect_error([] { open_tensorrt(NVINFER_8601); }, ADAFUSE_ERR_TENSORRT,
               std::string(NVINFER_8601) + ": TensorRT 8.6.1 is too old; this runtime needs TensorRT 10.x (libnvinfer.so.10)");
}

TEST(TensorRTLibrary, AcceptsTensorRT10AndReadsItsVersion) {
  const TensorRTLibrary lib = open_tensorrt(NVINFER_101401);
  EXPECT_EQ(lib.version, 101401);
  EXPECT_EQ(lib.version_text, "10.14.1");
}

TEST(TensorRTLibrary, RefusesALibraryThatIsNotTensorRT) {
  expect_error([] { open_tensorrt(PLUGIN_STUB); }, ADAFUSE_ERR_TENSORRT,
               std::string(PLUGIN_STUB) + ": not a TensorRT runtime library (no getInferLibVersion / createInferRuntime_INTERNAL); "
                                          "this runtime needs TensorRT 10.x (libnvinfer.so.10)");
}

TEST(PluginLibrary, ChecksTheEntryPoints) {
  EXPECT_NO_THROW(check_plugin_library(PLUGIN_STUB, "e.engine"));
  expect_error([] { check_plugin_library(NOT_A_PLUGIN_STUB, "e.engine"); }, ADAFUSE_ERR_PLUGIN,
               std::string(NOT_A_PLUGIN_STUB) +
                   ": not a TensorRT plugin library (it does not export getCreators, which IPluginRegistry::loadLibrary needs)");
  expect_error([] { check_plugin_library("/nonexistent/libadafuse_trt_plugins.so", "e.engine"); }, ADAFUSE_ERR_PLUGIN,
               "/nonexistent/libadafuse_trt_plugins.so: plugin library not found (needed by e.engine)");
  TempDir dir;
  write_file(dir / "libjunk.so", "not an ELF file");
  expect_error_containing([&] { check_plugin_library((dir / "libjunk.so").string(), "e.engine"); }, ADAFUSE_ERR_PLUGIN,
                          (dir / "libjunk.so").string() + ": cannot load the plugin library: ");
}

}  // namespace
}  // namespace adafuse::testing
