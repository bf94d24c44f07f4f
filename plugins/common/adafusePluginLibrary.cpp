// adafusePluginLibrary.cpp - the two C entry points TensorRT's
// IPluginRegistry::loadLibrary looks up in libadafuse_trt_plugins.so, and the TensorRT major the
// library was built for (the adafuse runtime refuses a library built for another one).
#include <NvInferVersion.h>

#include "adafuseLoraLinearPlugin.h"
#include "adafusePluginCommon.h"
#include "adafuseSwitchLinearPlugin.h"

#define ADAFUSE_PLUGIN_EXPORT extern "C" __attribute__((visibility("default")))

// NV_TENSORRT_MAJOR of the headers this library was compiled against: TensorRT 11 changes ILogger's
// layout, so the library runs only under that major.
ADAFUSE_PLUGIN_EXPORT int32_t adafuse_plugin_tensorrt_major()
{
    return NV_TENSORRT_MAJOR;
}

ADAFUSE_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    adafuse::plugin::setLoggerFinder(finder);
}

ADAFUSE_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    // TensorRT's loadLibrary calls setLoggerFinder first, so the driver check reaches its logger.
    adafuse::plugin::logDriverCheckOnce();
    static adafuse::plugin::AdafuseLoraLinearPluginCreator sLoraCreator;
    static adafuse::plugin::AdafuseSwitchLinearPluginCreator sSwitchCreator;
    static nvinfer1::IPluginCreatorInterface* const sCreators[] = {&sLoraCreator, &sSwitchCreator};
    nbCreators = static_cast<int32_t>(sizeof(sCreators) / sizeof(sCreators[0]));
    return sCreators;
}
