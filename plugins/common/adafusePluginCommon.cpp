#include "adafusePluginCommon.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <mutex>

namespace adafuse
{
namespace plugin
{
namespace
{
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};
std::mutex gStderrMutex;

char const* severityName(nvinfer1::ILogger::Severity s)
{
    switch (s)
    {
    case nvinfer1::ILogger::Severity::kINTERNAL_ERROR: return "INTERNAL_ERROR";
    case nvinfer1::ILogger::Severity::kERROR: return "ERROR";
    case nvinfer1::ILogger::Severity::kWARNING: return "WARNING";
    case nvinfer1::ILogger::Severity::kINFO: return "INFO";
    case nvinfer1::ILogger::Severity::kVERBOSE: return "VERBOSE";
    }
    return "?";
}
} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

void log(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
        nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
        if (logger != nullptr)
        {
            logger->log(severity, message.c_str());
            return;
        }
        if (severity <= nvinfer1::ILogger::Severity::kWARNING)
        {
            std::lock_guard<std::mutex> lock(gStderrMutex);
            std::fprintf(stderr, "[adafuse_trt_plugins] %s: %s\n", severityName(severity), message.c_str());
        }
    }
    catch (...)
    {
    }
}

DriverCheck const& driverCheck() noexcept
{
    static DriverCheck const kCheck = [] {
        char line[512] = "";
        int const status = adafuse_check_runtime(line, sizeof(line));
        return DriverCheck{status, std::string(line)};
    }();
    return kCheck;
}

void logDriverCheckOnce() noexcept
{
    static bool const kLogged = [] {
        DriverCheck const& c = driverCheck();
        if (c.status == ADAFUSE_ERR_NO_DRIVER)
        {
            logWarning(str("adafuse_trt_plugins: ", c.line, "; plugins can be created and serialised, not run"));
        }
        else if (c.status != ADAFUSE_OK)
        {
            logError(str("adafuse_trt_plugins: ", c.line, "; every plugin is refused"));
        }
        return true;
    }();
    (void) kLogged;
}

void requireDriver(char const* plugin, bool allowNoDriver)
{
    DriverCheck const& c = driverCheck();
    if (c.status == ADAFUSE_OK || (allowNoDriver && c.status == ADAFUSE_ERR_NO_DRIVER))
    {
        return;
    }
    throw PluginError(str(plugin, ": refused: ", c.line));
}

char const* dataTypeName(nvinfer1::DataType t) noexcept
{
    switch (t)
    {
    case nvinfer1::DataType::kFLOAT: return "float32";
    case nvinfer1::DataType::kHALF: return "float16";
    case nvinfer1::DataType::kBF16: return "bfloat16";
    case nvinfer1::DataType::kINT32: return "int32";
    case nvinfer1::DataType::kINT64: return "int64";
    case nvinfer1::DataType::kINT8: return "int8";
    case nvinfer1::DataType::kBOOL: return "bool";
    case nvinfer1::DataType::kUINT8: return "uint8";
    case nvinfer1::DataType::kFP8: return "fp8";
    default: return "other";
    }
}

char const* fieldTypeName(nvinfer1::PluginFieldType t) noexcept
{
    switch (t)
    {
    case nvinfer1::PluginFieldType::kFLOAT16: return "kFLOAT16";
    case nvinfer1::PluginFieldType::kFLOAT32: return "kFLOAT32";
    case nvinfer1::PluginFieldType::kFLOAT64: return "kFLOAT64";
    case nvinfer1::PluginFieldType::kINT8: return "kINT8";
    case nvinfer1::PluginFieldType::kINT16: return "kINT16";
    case nvinfer1::PluginFieldType::kINT32: return "kINT32";
    case nvinfer1::PluginFieldType::kCHAR: return "kCHAR";
    case nvinfer1::PluginFieldType::kDIMS: return "kDIMS";
    case nvinfer1::PluginFieldType::kBF16: return "kBF16";
    case nvinfer1::PluginFieldType::kINT64: return "kINT64";
    default: return "other";
    }
}

std::string dimsToString(nvinfer1::Dims const& d)
{
    std::ostringstream os;
    os << "[";
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        os << (i ? ", " : "") << d.d[i];
    }
    os << "]";
    return os.str();
}

bool isSupportedFloat(nvinfer1::DataType t) noexcept
{
    return t == nvinfer1::DataType::kFLOAT || t == nvinfer1::DataType::kHALF || t == nvinfer1::DataType::kBF16;
}

adafuse_dtype toKernelDtype(nvinfer1::DataType t, char const* plugin)
{
    switch (t)
    {
    case nvinfer1::DataType::kFLOAT: return ADAFUSE_FLOAT32;
    case nvinfer1::DataType::kHALF: return ADAFUSE_FLOAT16;
    case nvinfer1::DataType::kBF16: return ADAFUSE_BFLOAT16;
    default: break;
    }
    throw PluginError(str(plugin, ": unsupported data type ", dataTypeName(t), " (expected float32, float16 or bfloat16)"));
}

size_t dataTypeSize(nvinfer1::DataType t, char const* plugin)
{
    switch (t)
    {
    case nvinfer1::DataType::kFLOAT:
    case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kHALF:
    case nvinfer1::DataType::kBF16: return 2;
    default: break;
    }
    throw PluginError(str(plugin, ": unsupported data type ", dataTypeName(t)));
}

FieldReader::FieldReader(char const* plugin, nvinfer1::PluginFieldCollection const* fc)
    : mPlugin(plugin)
    , mFc(fc)
{
    check(fc != nullptr, plugin, "PluginFieldCollection is null");
    check(fc->nbFields >= 0 && (fc->nbFields == 0 || fc->fields != nullptr), plugin,
        "PluginFieldCollection has nbFields=", fc->nbFields, " but no field array");
}

bool FieldReader::has(char const* name) const
{
    for (int32_t i = 0; i < mFc->nbFields; ++i)
    {
        if (mFc->fields[i].name != nullptr && std::strcmp(mFc->fields[i].name, name) == 0)
        {
            return true;
        }
    }
    return false;
}

nvinfer1::PluginField const& FieldReader::find(char const* name) const
{
    nvinfer1::PluginField const* found = nullptr;
    for (int32_t i = 0; i < mFc->nbFields; ++i)
    {
        if (mFc->fields[i].name != nullptr && std::strcmp(mFc->fields[i].name, name) == 0)
        {
            check(found == nullptr, mPlugin, "field '", name, "' is given more than once");
            found = &mFc->fields[i];
        }
    }
    check(found != nullptr, mPlugin, "required field '", name, "' is missing");
    check(found->length == 1, mPlugin, "field '", name, "' must hold exactly 1 value, found length ", found->length);
    check(found->data != nullptr, mPlugin, "field '", name, "' has no data");
    return *found;
}

int32_t FieldReader::getInt32(char const* name) const
{
    nvinfer1::PluginField const& f = find(name);
    int64_t v = 0;
    switch (f.type)
    {
    case nvinfer1::PluginFieldType::kINT32: v = *static_cast<int32_t const*>(f.data); break;
    case nvinfer1::PluginFieldType::kINT64: v = *static_cast<int64_t const*>(f.data); break;
    case nvinfer1::PluginFieldType::kINT16: v = *static_cast<int16_t const*>(f.data); break;
    case nvinfer1::PluginFieldType::kINT8: v = *static_cast<int8_t const*>(f.data); break;
    default:
        throw PluginError(str(mPlugin, ": field '", name, "' must be an integer (kINT32), found type ",
            fieldTypeName(f.type)));
    }
    check(v >= std::numeric_limits<int32_t>::min() && v <= std::numeric_limits<int32_t>::max(), mPlugin,
        "field '", name, "' = ", v, " does not fit in int32");
    return static_cast<int32_t>(v);
}

float FieldReader::getFloat32(char const* name) const
{
    nvinfer1::PluginField const& f = find(name);
    double v = 0.0;
    switch (f.type)
    {
    case nvinfer1::PluginFieldType::kFLOAT32: v = *static_cast<float const*>(f.data); break;
    case nvinfer1::PluginFieldType::kFLOAT64: v = *static_cast<double const*>(f.data); break;
    default:
        throw PluginError(str(mPlugin, ": field '", name, "' must be a float (kFLOAT32), found type ",
            fieldTypeName(f.type)));
    }
    return static_cast<float>(v);
}

std::vector<std::string> FieldReader::unknownFields(std::vector<char const*> const& known) const
{
    std::vector<std::string> out;
    for (int32_t i = 0; i < mFc->nbFields; ++i)
    {
        char const* n = mFc->fields[i].name;
        if (n == nullptr)
        {
            out.emplace_back("<null>");
            continue;
        }
        bool ok = std::strcmp(n, "plugin_version") == 0 || std::strcmp(n, "plugin_namespace") == 0;
        for (char const* k : known)
        {
            ok = ok || std::strcmp(n, k) == 0;
        }
        if (!ok)
        {
            out.emplace_back(n);
        }
    }
    return out;
}

} // namespace plugin
} // namespace adafuse
