// adafusePluginLibrary.cpp - the two C entry points TensorRT's
// IPluginRegistry::loadLibrary looks up in libadafuse_trt_plugins.so.
#include "adafuseLoraLinearPlugin.h"
#include "adafusePluginCommon.h"
#include "adafuseSwitchLinearPlugin.h"

#define ADAFUSE_PLUGIN_EXPORT extern "C" __attribute__((visibility("default")))

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
