// adafuseLinearPluginBase.h - what the AdafuseLoraLinear and AdafuseSwitchLinear
// IPluginV3 plugins do identically (same fields, same tensors, same rules):
//   LinearPluginBase     - capability interfaces, name/version/namespace, field
//                          storage and getFieldsToSerialize, output dtype/shape rules,
//                          supportsFormatCombination, configurePlugin, onShapeChange
//                          checks, attachToContext (= clone), and the unmerged
//                          adafuse_lora_linear launch;
//   LinearPluginCreator  - the IPluginCreatorV3One: identity, field list and
//                          createPlugin (parse + validate the fields).
// Each plugin folder keeps what differs: clone, getWorkspaceSize, enqueue, its own state.
#ifndef ADAFUSE_LINEAR_PLUGIN_BASE_H
#define ADAFUSE_LINEAR_PLUGIN_BASE_H

#include "adafuseExpertIdCheck.h"
#include "adafuseLinearConfig.h"

namespace adafuse
{
namespace plugin
{

//! Name, version and namespace of one plugin (string literals).
struct PluginIdentity
{
    char const* name;
    char const* version;
    char const* pluginNamespace;
};

class LinearPluginBase : public nvinfer1::IPluginV3,
                         public nvinfer1::IPluginV3OneCore,
                         public nvinfer1::IPluginV3OneBuild,
                         public nvinfer1::IPluginV3OneRuntime
{
public:
    ~LinearPluginBase() override = default;
    LinearPluginBase(LinearPluginBase const&) = delete;
    LinearPluginBase& operator=(LinearPluginBase const&) = delete;

    // IPluginV3 (clone: the plugin)
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild (getWorkspaceSize: the plugin)
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;

    // IPluginV3OneRuntime (enqueue: the plugin)
    //! Checks the tensors against the fields, then calls shapeChanged().
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    //! A clone per execution context (a plugin's per-instance state is never shared), whose
    //! device state is allocated here, before its first enqueue (see attached()). Refused when
    //! the CUDA driver is missing or older than the kernels' build needs (requireDriver).
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

protected:
    LinearPluginBase(PluginIdentity const& identity, LinearConfig const& config);

    //! Called on the clone that attachToContext returns (inside its error guard, outside any
    //! enqueue, so outside stream capture): allocates per-context device state. Overrides
    //! call the base first.
    virtual void attached();
    //! The debug-mode expert_ids check (adafuseExpertIdCheck.h) of runtime instances; a no-op
    //! unless enabled, and for build-time instances (whose timing inputs are uninitialised).
    void checkExpertIds(int32_t rows, void const* const* inputs, cudaStream_t stream);

    //! clone() of a plugin constructible from its LinearConfig: new Plugin(config), fields only.
    template <typename Plugin>
    nvinfer1::IPluginV3* cloneAs() const noexcept
    {
        return guarded<nvinfer1::IPluginV3*>(
            name(), "clone", nullptr, [&]() -> nvinfer1::IPluginV3* { return new Plugin(mConfig); });
    }

    char const* name() const noexcept { return mIdentity.name; }
    //! The bias input, or nullptr when has_bias = 0.
    void const* biasInput(void const* const* inputs) const noexcept;
    //! The unmerged routed path: adafuse_lora_linear over `rows` (> 0) rows of the inputs,
    //! in chunks of at most kLORA_CHUNK_ROWS rows (the workspace holds one chunk). Throws on failure.
    //! exclusiveWorkspace: adafuse_lora_options::exclusive_workspace, true only for memory this
    //! instance owns (never TensorRT's scratch, which earlier layers' kernels may still read).
    void enqueueLoraLinear(nvinfer1::PluginTensorDesc const* inputDesc, int32_t rows, void const* const* inputs,
        void* const* outputs, void* workspace, bool exclusiveWorkspace, cudaStream_t stream) const;

    PluginIdentity const mIdentity;
    LinearConfig mConfig;

private:
    bool mAttached{false};
    ExpertIdCheck mIdCheck;
};

class LinearPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    ~LinearPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    //! Parses and validates the fields, then create().
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

protected:
    explicit LinearPluginCreator(PluginIdentity const& identity);
    //! new Plugin(config) of the plugin this creator makes.
    virtual nvinfer1::IPluginV3* create(LinearConfig const& config) const = 0;

private:
    PluginIdentity const mIdentity;
};

} // namespace plugin
} // namespace adafuse

#endif // ADAFUSE_LINEAR_PLUGIN_BASE_H
