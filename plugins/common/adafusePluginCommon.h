// adafusePluginCommon.h - helpers shared by the adafuse TensorRT plugins:
// the logger (fed by setLoggerFinder), the error type and checks, plugin field
// parsing and dtype mapping.
#ifndef ADAFUSE_PLUGIN_COMMON_H
#define ADAFUSE_PLUGIN_COMMON_H

#include "NvInferRuntime.h"
#include "adafuse_kernels.h"

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace adafuse
{
namespace plugin
{

//! Library-wide logger finder, set by the exported setLoggerFinder().
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
//! Log through TensorRT's logger when one was given, else to stderr.
void log(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;
inline void logError(std::string const& message) noexcept
{
    log(nvinfer1::ILogger::Severity::kERROR, message);
}
inline void logWarning(std::string const& message) noexcept
{
    log(nvinfer1::ILogger::Severity::kWARNING, message);
}

//! The one exception type thrown inside plugin code; every noexcept entry point
//! catches it (and std::exception) and reports through the logger.
class PluginError : public std::runtime_error
{
public:
    explicit PluginError(std::string const& message)
        : std::runtime_error(message)
    {
    }
};

//! Builds a message from streamable parts: str("a", 1, 'b').
template <typename... Args>
std::string str(Args const&... args)
{
    std::ostringstream os;
    (os << ... << args);
    return os.str();
}

//! Throws PluginError("<plugin>: <message>") when cond is false.
template <typename... Args>
inline void check(bool cond, char const* plugin, Args const&... args)
{
    if (!cond)
    {
        throw PluginError(str(plugin, ": ", args...));
    }
}

//! Runs `body` and turns any exception into a logged error and `onError`.
//! Used by every noexcept entry point.
template <typename R, typename F>
R guarded(char const* plugin, char const* method, R onError, F&& body) noexcept
{
    try
    {
        return body();
    }
    catch (PluginError const& e)
    {
        logError(str(e.what(), " [in ", method, "]"));
    }
    catch (std::exception const& e)
    {
        logError(str(plugin, ": ", method, " failed: ", e.what()));
    }
    catch (...)
    {
        logError(str(plugin, ": ", method, " failed with an unknown exception"));
    }
    return onError;
}

//! The kernel library's driver check (adafuse_check_runtime), made once per process: its status
//! (adafuse_status) and one line naming the driver's and the build's CUDA versions.
struct DriverCheck
{
    int status;
    std::string line;
};
DriverCheck const& driverCheck() noexcept;
//! Logs the driver check once per process, when the library hands out its creators: an error
//! when the driver is too old (or cannot be queried), a warning when there is none.
void logDriverCheckOnce() noexcept;
//! Throws PluginError("<plugin>: refused: <line>") unless the driver check passed or, with
//! allowNoDriver, found no driver at all. Creating plugins without a driver is allowed: the build-
//! side contract (fields, shapes, formats, serialisation) is exercised on machines without a GPU
//! (CI, TensorRT-RTX's registry on a CPU host); nothing can run there, and attaching a plugin to
//! an execution context is refused. A driver older than the build's floor is refused everywhere:
//! every enqueue would fail.
void requireDriver(char const* plugin, bool allowNoDriver);

char const* dataTypeName(nvinfer1::DataType t) noexcept;
char const* fieldTypeName(nvinfer1::PluginFieldType t) noexcept;
std::string dimsToString(nvinfer1::Dims const& d);

//! Maps a TensorRT float type to the kernel ABI dtype; throws for others.
adafuse_dtype toKernelDtype(nvinfer1::DataType t, char const* plugin);
bool isSupportedFloat(nvinfer1::DataType t) noexcept;
size_t dataTypeSize(nvinfer1::DataType t, char const* plugin);

//! Scalar field lookup in a PluginFieldCollection with type and length checks.
//! Integers may come as kINT32 / kINT64 / kINT16 / kINT8 (range-checked);
//! floats as kFLOAT32 / kFLOAT64 / kFLOAT16 is rejected (ambiguous precision).
class FieldReader
{
public:
    FieldReader(char const* plugin, nvinfer1::PluginFieldCollection const* fc);
    bool has(char const* name) const;
    int32_t getInt32(char const* name) const;
    float getFloat32(char const* name) const;
    //! Names in the collection that are not in `known` (and not plugin_version / plugin_namespace).
    std::vector<std::string> unknownFields(std::vector<char const*> const& known) const;

private:
    nvinfer1::PluginField const& find(char const* name) const;
    char const* mPlugin;
    nvinfer1::PluginFieldCollection const* mFc;
};

} // namespace plugin
} // namespace adafuse

#endif // ADAFUSE_PLUGIN_COMMON_H
