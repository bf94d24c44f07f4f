// TensorRT opened at run time: absent, too old, not TensorRT; plugin libraries with and without
// the entry points IPluginRegistry::loadLibrary needs.
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
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

TEST(TensorRTLibrary, TakesItsMajorAndSonameFromTheHeadersItWasBuiltAgainst) {
  EXPECT_EQ(tensorrt_major(), 10);  // built here against the TensorRT 10.14.1 headers
  EXPECT_EQ(tensorrt_soname(), "libnvinfer.so.10");
  EXPECT_EQ(tensorrt_soname(TensorRTRuntime::lean), "libnvinfer_lean.so.10");
}

TEST(LeanRuntime, SaysWhatItLookedForWhenAbsent) {
  expect_error_containing([] { open_tensorrt("/nonexistent/libnvinfer_lean.so.10", TensorRTRuntime::lean); }, ADAFUSE_ERR_TENSORRT,
                          "TensorRT lean runtime not found: a version-compatible engine needs TensorRT 10.x's lean runtime "
                          "(tried /nonexistent/libnvinfer_lean.so.10: ");
  expect_error_containing([] { open_tensorrt("/nonexistent/libnvinfer_lean.so.10", TensorRTRuntime::lean); }, ADAFUSE_ERR_TENSORRT,
                          "); install it (pip install tensorrt-lean-cu12-libs==10.* or tensorrt-lean-cu13-libs==10.*, the "
                          "engine's version) or pass its libnvinfer_lean.so path");
}

TEST(LeanRuntime, RefusesAnotherMajorNamingTheLeanLibrary) {
  expect_error([] { open_tensorrt(NVINFER_110400, TensorRTRuntime::lean); }, ADAFUSE_ERR_TENSORRT,
               std::string(NVINFER_110400) + ": TensorRT 11.4.0 is newer than this runtime was built for; it needs TensorRT 10.x "
                                             "(libnvinfer_lean.so.10); TensorRT 11 needs a runtime built against its headers");
  expect_error([] { open_tensorrt(PLUGIN_STUB, TensorRTRuntime::lean); }, ADAFUSE_ERR_TENSORRT,
               std::string(PLUGIN_STUB) + ": not a TensorRT runtime library (no getInferLibVersion / createInferRuntime_INTERNAL); "
                                          "this runtime needs TensorRT 10.x (libnvinfer_lean.so.10)");
}

// pip's tensorrt-lean-cuXX-libs installs site-packages/tensorrt_lean_libs; the full wheel's tensorrt_libs holds a
// libnvinfer_lean too. Per site, tensorrt_lean_libs comes first; the full runtime never looks there.
TEST(LeanRuntime, SearchesPipsTensorRTLeanLibsThenTensorRTLibs) {
  if (void* h = dlopen("libnvinfer_lean.so.10", RTLD_LAZY)) {
    dlclose(h);
    GTEST_SKIP() << "TensorRT's lean runtime is on the loader's path here";
  }
  TempDir venv;
  const fs::path site = venv / "lib" / "python3.11" / "site-packages";
  fs::create_directories(site / "tensorrt_lean_libs");
  fs::create_directories(site / "tensorrt_libs");
  fs::copy_file(NVINFER_101401, site / "tensorrt_lean_libs" / "libnvinfer_lean.so.10");
  fs::copy_file(NVINFER_110400, site / "tensorrt_libs" / "libnvinfer_lean.so.10");  // told apart by their versions
  const char* old = std::getenv("VIRTUAL_ENV");
  const std::string saved = old ? old : "";
  setenv("VIRTUAL_ENV", venv.path().c_str(), 1);
  const std::string lean_dir = fs::canonical(site / "tensorrt_lean_libs").string();
  const std::string full_dir = fs::canonical(site / "tensorrt_libs").string();
  const std::vector<std::string> dirs = pip_tensorrt_dirs(TensorRTRuntime::lean);
  const auto at = [&](const std::string& d) { return std::find(dirs.begin(), dirs.end(), d) - dirs.begin(); };
  ASSERT_LT(at(lean_dir), static_cast<long>(dirs.size()));
  EXPECT_EQ(at(full_dir), at(lean_dir) + 1);
  const std::vector<std::string> full = pip_tensorrt_dirs();
  EXPECT_EQ(std::find(full.begin(), full.end(), lean_dir), full.end());
  {
    const TensorRTLibrary lib = open_tensorrt("", TensorRTRuntime::lean);
    EXPECT_EQ(lib.library.path(), lean_dir + "/libnvinfer_lean.so.10");
    EXPECT_EQ(lib.version_text, "10.14.1");
    EXPECT_EQ(lib.kind, TensorRTRuntime::lean);
  }
  fs::remove(site / "tensorrt_lean_libs" / "libnvinfer_lean.so.10");  // then the full wheel's folder
  expect_error([] { open_tensorrt("", TensorRTRuntime::lean); }, ADAFUSE_ERR_TENSORRT,
               full_dir + "/libnvinfer_lean.so.10: TensorRT 11.4.0 is newer than this runtime was built for; it needs TensorRT "
                          "10.x (libnvinfer_lean.so.10); TensorRT 11 needs a runtime built against its headers");
  if (old) setenv("VIRTUAL_ENV", saved.c_str(), 1); else unsetenv("VIRTUAL_ENV");
}

TEST(LeanRuntime, RunsAVersionCompatibleEngineOnlyOnTheLeanRuntimeOfItsTensorRT) {
  const TensorRTLibrary lib = open_tensorrt(NVINFER_101401, TensorRTRuntime::lean);
  EXPECT_NO_THROW(check_engine_tensorrt_version("e.engine", "10.14.1.48", lib));
  // The plan leaves the lean runtime out (kEXCLUDE_LEAN_RUNTIME): an older or a newer lean runtime is refused.
  for (const char* other : {"10.13.0.35", "10.16.1.11"})
    expect_error([&] { check_engine_tensorrt_version("e.engine", other, lib); }, ADAFUSE_ERR_TENSORRT,
                 std::string("e.engine: version-compatible engine built with TensorRT ") + other + ", but " + NVINFER_101401 +
                     " is the lean runtime of TensorRT 10.14.1; its plan leaves the lean runtime out, so it runs on the lean "
                     "runtime of the TensorRT that built it (load TensorRT " + std::string(other).substr(0, 7) +
                     "'s libnvinfer_lean, or convert it again with this one)");
}

TEST(TensorRTLibrary, RefusesANewerMajorThanItWasBuiltFor) {
  expect_error([] { open_tensorrt(NVINFER_110400); }, ADAFUSE_ERR_TENSORRT,
               std::string(NVINFER_110400) + ": TensorRT 11.4.0 is newer than this runtime was built for; it needs TensorRT 10.x "
                                             "(libnvinfer.so.10); TensorRT 11 needs a runtime built against its headers");
}

// pip installs libnvinfer.so.10 under site-packages/tensorrt_libs, off the loader's path.
TEST(TensorRTLibrary, FindsPipsTensorRTLibs) {
  if (void* h = dlopen("libnvinfer.so.10", RTLD_LAZY)) {
    dlclose(h);
    GTEST_SKIP() << "TensorRT is installed here";
  }
  TempDir venv;
  const fs::path libs = venv / "lib" / "python3.12" / "site-packages" / "tensorrt_libs";
  fs::create_directories(libs);
  fs::copy_file(NVINFER_101401, libs / "libnvinfer.so.10");
  const char* old = std::getenv("VIRTUAL_ENV");
  const std::string saved = old ? old : "";
  setenv("VIRTUAL_ENV", venv.path().c_str(), 1);
  const std::vector<std::string> dirs = pip_tensorrt_dirs();
  const std::string dir = fs::canonical(libs).string();
  EXPECT_NE(std::find(dirs.begin(), dirs.end(), dir), dirs.end());
  {
    const TensorRTLibrary lib = open_tensorrt("");
    EXPECT_EQ(lib.library.path(), dir + "/libnvinfer.so.10");
    EXPECT_EQ(lib.version_text, "10.14.1");
  }
  // Where none is there, the message says where it looked and what to install.
  TempDir empty;
  const fs::path none = empty / "lib" / "python3.11" / "site-packages" / "tensorrt_libs";
  fs::create_directories(none);
  setenv("VIRTUAL_ENV", empty.path().c_str(), 1);
  expect_error_containing([] { open_tensorrt(""); }, ADAFUSE_ERR_TENSORRT,
                          "(tried libnvinfer.so.10, libnvinfer.so, " + fs::canonical(none).string() + "/libnvinfer.so.10: ");
  expect_error_containing([] { open_tensorrt(""); }, ADAFUSE_ERR_TENSORRT,
                          "); install it (pip install tensorrt-cu12==10.* or tensorrt-cu13==10.*) or pass its libnvinfer.so path");
  if (old) setenv("VIRTUAL_ENV", saved.c_str(), 1); else unsetenv("VIRTUAL_ENV");
}

TEST(TensorRTLibrary, RefusesAnEngineBuiltByAnotherTensorRT) {
  const TensorRTLibrary lib = open_tensorrt(NVINFER_101401);
  EXPECT_NO_THROW(check_engine_tensorrt_version("e.engine", "10.14.1.48", lib));
  EXPECT_NO_THROW(check_engine_tensorrt_version("e.engine", "10.14.1", lib));
  expect_error([&] { check_engine_tensorrt_version("e.engine", "10.13.0.35", lib); }, ADAFUSE_ERR_TENSORRT,
               "e.engine: built with TensorRT 10.13.0.35, but " + std::string(NVINFER_101401) +
                   " is TensorRT 10.14.1; an engine runs only on the TensorRT that built it (load TensorRT 10.13.0, or convert it "
                   "again with this one)");
  expect_error_containing([&] { check_engine_tensorrt_version("e.engine", "11.4.0.1", lib); }, ADAFUSE_ERR_TENSORRT,
                          "e.engine: built with TensorRT 11.4.0.1, but ");
  expect_error_containing([&] { check_engine_tensorrt_version("e.engine", "10.14.2", lib); }, ADAFUSE_ERR_TENSORRT,
                          "e.engine: built with TensorRT 10.14.2, but ");
  for (const char* bad : {"unknown", "10.14", "", "10.14.1x"})
    expect_error([&] { check_engine_tensorrt_version("e.engine", bad, lib); }, ADAFUSE_ERR_TENSORRT,
                 std::string("e.engine: its manifest does not say which TensorRT built it (engine.backend_version '") + bad +
                     "'); convert it again");
}

TEST(PluginLibrary, RefusesOneBuiltForAnotherTensorRTMajor) {
  expect_error([] { check_plugin_library(PLUGIN_STUB_OTHER_MAJOR, "e.engine"); }, ADAFUSE_ERR_PLUGIN,
               std::string(PLUGIN_STUB_OTHER_MAJOR) +
                   ": plugin library built for TensorRT 99, this runtime for TensorRT 10; use the plugin library built with this runtime");
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
