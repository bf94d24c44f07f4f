// TensorRT opened at run time: absent, too old, not TensorRT; plugin libraries with and without
// the entry points IPluginRegistry::loadLibrary needs.
#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

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

TEST(PluginRegistrations, LoadsEachLibraryOncePerRegistry) {
  TempDir dir;
  write_file(dir / "libplugins.so", "stand-in");
  fs::create_directory(dir / "sub");
  PluginRegistrations registrations;
  int loads = 0;
  const auto load = [&] { ++loads; };
  const int registry_a = 0, registry_b = 0;  // two registries (two libnvinfer copies), told apart by address
  const std::string path = (dir / "libplugins.so").string();
  EXPECT_TRUE(registrations.register_once(&registry_a, path, load));
  // The same file under other spellings (every open names it as its options or environment do).
  EXPECT_FALSE(registrations.register_once(&registry_a, path, load));
  EXPECT_FALSE(registrations.register_once(&registry_a, (dir / "sub" / ".." / "libplugins.so").string(), load));
  EXPECT_FALSE(registrations.register_once(&registry_a, (dir / "." / "libplugins.so").string(), load));
  EXPECT_EQ(loads, 1);
  EXPECT_TRUE(registrations.register_once(&registry_b, path, load));
  EXPECT_EQ(loads, 2);
}

TEST(PluginRegistrations, AFailedLoadIsTriedAgain) {
  PluginRegistrations registrations;
  const int registry = 0;
  int loads = 0;
  expect_error([&] {
    registrations.register_once(&registry, "/nonexistent/libplugins.so", [&] {
      ++loads;
      fail(ADAFUSE_ERR_PLUGIN, "/nonexistent/libplugins.so: TensorRT could not load the plugin library");
    });
  }, ADAFUSE_ERR_PLUGIN, "/nonexistent/libplugins.so: TensorRT could not load the plugin library");
  EXPECT_TRUE(registrations.register_once(&registry, "/nonexistent/libplugins.so", [&] { ++loads; }));
  EXPECT_EQ(loads, 2);
}

TEST(PluginRegistrations, ConcurrentOpensLoadOnce) {
  PluginRegistrations registrations;
  const int registry = 0;
  std::atomic<int> loads{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i)
    threads.emplace_back([&] {
      registrations.register_once(&registry, "/opt/lib/libplugins.so", [&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a slow load: the others must wait, not load
        ++loads;
      });
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(loads.load(), 1);
}

}  // namespace
}  // namespace adafuse::testing
