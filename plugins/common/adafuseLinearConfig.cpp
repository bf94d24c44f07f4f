#include "adafuseLinearConfig.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace adafuse
{
namespace plugin
{
namespace
{
using nvinfer1::DataType;
using nvinfer1::Dims;

char const* inputName(int32_t i)
{
    switch (i)
    {
    case kINPUT_X: return "x";
    case kINPUT_W: return "W";
    case kINPUT_A: return "A";
    case kINPUT_B: return "B";
    case kINPUT_EXPERT_IDS: return "expert_ids";
    case kINPUT_GATES: return "gates";
    case kINPUT_BIAS: return "bias";
    default: return "?";
    }
}

// The type W must have, and the one x may have: 16-bit x only with FP8 W (the kernels' W8A16 path).
DataType wantedWeightType(LinearConfig const& cfg, DataType x)
{
    return cfg.fp8Weights() ? DataType::kFP8 : x;
}

bool xTypeAllowed(LinearConfig const& cfg, DataType x)
{
    return isSupportedFloat(x) && !(cfg.fp8Weights() && x == DataType::kFLOAT);
}

char const* xTypesText(LinearConfig const& cfg)
{
    return cfg.fp8Weights() ? "float16 or bfloat16 (weight_dtype 1: FP8 W)" : "float32, float16 or bfloat16";
}

struct TensorView
{
    DataType type;
    Dims dims;
    nvinfer1::TensorFormat format;
};

// Checks dimension `axis` of a tensor: -1 (dynamic) passes, anything else must equal `expected`.
void checkDim(char const* plugin, char const* tensor, Dims const& d, int32_t axis, int64_t expected,
    char const* meaning)
{
    int64_t found = d.d[axis];
    check(found < 0 || found == expected, plugin, tensor, " dimension ", axis, " expected ", meaning, "=", expected,
        ", found ", found, " (shape ", dimsToString(d), ")");
}

void checkRank(char const* plugin, char const* tensor, Dims const& d, int32_t expected)
{
    check(d.nbDims == expected, plugin, tensor, " expected ", expected, " dimensions, found ", d.nbDims, " (shape ",
        dimsToString(d), ")");
}

// A known dimension beyond a kernel limit: named before the comparison with the fields, so
// that the message says which limit (not only that the tensor disagrees with the fields).
void checkLimit(char const* plugin, char const* tensor, Dims const& d, int32_t axis, char const* meaning,
    int64_t limit, char const* limitName)
{
    if (axis < 0 || axis >= d.nbDims)
    {
        return;
    }
    int64_t const found = d.d[axis];
    check(found < 0 || found <= limit, plugin, tensor, " dimension ", axis, " (", meaning, ") = ", found,
        " exceeds the kernel limit ", limit, " (", limitName, " in adafuse_kernels.h)");
}

void checkViews(LinearConfig const& cfg, std::vector<TensorView> const& in, std::vector<TensorView> const& out)
{
    char const* p = cfg.pluginName();
    LinearFields const& f = cfg.fields();
    check(static_cast<int32_t>(in.size()) == cfg.nbInputs(), p, "expected ", cfg.nbInputs(),
        " inputs (has_bias=", f.hasBias, "), found ", in.size());
    check(static_cast<int32_t>(out.size()) == kNB_OUTPUTS, p, "expected ", kNB_OUTPUTS, " output, found ",
        out.size());
    checkLimit(p, "input 2 (A)", in[kINPUT_A].dims, 0, "num_experts", ADAFUSE_LORA_MAX_EXPERTS,
        "ADAFUSE_LORA_MAX_EXPERTS");
    checkLimit(p, "input 2 (A)", in[kINPUT_A].dims, 1, "rank", ADAFUSE_LORA_MAX_RANK, "ADAFUSE_LORA_MAX_RANK");
    Dims const& ids = in[kINPUT_EXPERT_IDS].dims;
    checkLimit(p, "input 4 (expert_ids)", ids, ids.nbDims - 1, "top_k", ADAFUSE_MAX_TOP_K, "ADAFUSE_MAX_TOP_K");
    for (size_t i = 0; i < in.size(); ++i)
    {
        check(in[i].format == nvinfer1::TensorFormat::kLINEAR, p, "input ", i, " (", inputName(int32_t(i)),
            ") must use the linear format");
    }
    DataType const t = in[kINPUT_X].type;
    check(xTypeAllowed(cfg, t), p, "input 0 (x) expected ", xTypesText(cfg), ", found ", dataTypeName(t));
    check(in[kINPUT_W].type == wantedWeightType(cfg, t), p, "input 1 (W) expected ",
        cfg.fp8Weights() ? "fp8 (weight_dtype 1)" : "the dtype of x (", cfg.fp8Weights() ? "" : dataTypeName(t),
        cfg.fp8Weights() ? "" : ")", ", found ", dataTypeName(in[kINPUT_W].type));
    for (int32_t i : {kINPUT_A, kINPUT_B})
    {
        check(in[i].type == t, p, "input ", i, " (", inputName(i), ") expected the dtype of x (", dataTypeName(t),
            "), found ", dataTypeName(in[i].type));
    }
    if (f.hasBias)
    {
        check(in[kINPUT_BIAS].type == t, p, "input 6 (bias) expected the dtype of x (", dataTypeName(t), "), found ",
            dataTypeName(in[kINPUT_BIAS].type));
    }
    if (cfg.fp8Weights())
    {
        int32_t const s = cfg.weightScaleIndex();
        std::string const name = str("input ", s, " (weight_scale)");
        check(in[static_cast<size_t>(s)].type == DataType::kFLOAT, p, name, " expected float32, found ",
            dataTypeName(in[static_cast<size_t>(s)].type));
        checkRank(p, name.c_str(), in[static_cast<size_t>(s)].dims, 1);
        checkDim(p, name.c_str(), in[static_cast<size_t>(s)].dims, 0, f.outFeatures, "out_features");
    }
    check(in[kINPUT_EXPERT_IDS].type == DataType::kINT32, p, "input 4 (expert_ids) expected int32, found ",
        dataTypeName(in[kINPUT_EXPERT_IDS].type));
    check(in[kINPUT_GATES].type == DataType::kFLOAT, p, "input 5 (gates) expected float32, found ",
        dataTypeName(in[kINPUT_GATES].type));
    check(out[kOUTPUT_Y].type == t, p, "output 0 (y) expected the dtype of x (", dataTypeName(t), "), found ",
        dataTypeName(out[kOUTPUT_Y].type));

    Dims const& x = in[kINPUT_X].dims;
    check(x.nbDims >= 1, p, "input 0 (x) expected at least 1 dimension, found ", x.nbDims);
    checkDim(p, "input 0 (x)", x, x.nbDims - 1, f.inFeatures, "in_features");
    checkRank(p, "input 1 (W)", in[kINPUT_W].dims, 2);
    checkDim(p, "input 1 (W)", in[kINPUT_W].dims, 0, f.outFeatures, "out_features");
    checkDim(p, "input 1 (W)", in[kINPUT_W].dims, 1, f.inFeatures, "in_features");
    checkRank(p, "input 2 (A)", in[kINPUT_A].dims, 3);
    checkDim(p, "input 2 (A)", in[kINPUT_A].dims, 0, f.numExperts, "num_experts");
    checkDim(p, "input 2 (A)", in[kINPUT_A].dims, 1, f.rank, "rank");
    checkDim(p, "input 2 (A)", in[kINPUT_A].dims, 2, f.inFeatures, "in_features");
    checkRank(p, "input 3 (B)", in[kINPUT_B].dims, 3);
    checkDim(p, "input 3 (B)", in[kINPUT_B].dims, 0, f.numExperts, "num_experts");
    checkDim(p, "input 3 (B)", in[kINPUT_B].dims, 1, f.outFeatures, "out_features");
    checkDim(p, "input 3 (B)", in[kINPUT_B].dims, 2, f.rank, "rank");
    for (int32_t i : {kINPUT_EXPERT_IDS, kINPUT_GATES})
    {
        std::string const name = str("input ", i, " (", inputName(i), ")");
        Dims const& r = in[i].dims;
        checkRank(p, name.c_str(), r, x.nbDims);
        checkDim(p, name.c_str(), r, r.nbDims - 1, f.topK, "top_k");
        for (int32_t a = 0; a + 1 < x.nbDims; ++a)
        {
            if (x.d[a] >= 0)
            {
                checkDim(p, name.c_str(), r, a, x.d[a], "the matching leading dimension of x");
            }
        }
    }
    if (f.hasBias)
    {
        checkRank(p, "input 6 (bias)", in[kINPUT_BIAS].dims, 1);
        checkDim(p, "input 6 (bias)", in[kINPUT_BIAS].dims, 0, f.outFeatures, "out_features");
    }
    Dims const& y = out[kOUTPUT_Y].dims;
    checkRank(p, "output 0 (y)", y, x.nbDims);
    checkDim(p, "output 0 (y)", y, y.nbDims - 1, f.outFeatures, "out_features");
    for (int32_t a = 0; a + 1 < x.nbDims; ++a)
    {
        if (x.d[a] >= 0)
        {
            checkDim(p, "output 0 (y)", y, a, x.d[a], "the matching leading dimension of x");
        }
    }
}
} // namespace

LinearConfig::LinearConfig(char const* pluginName, LinearFields const& fields)
    : mPlugin(pluginName)
    , mFields(fields)
{
    validate();
}

LinearConfig::LinearConfig(LinearConfig const& other)
    : mPlugin(other.mPlugin)
    , mFields(other.mFields)
{
}

LinearConfig& LinearConfig::operator=(LinearConfig const& other)
{
    mPlugin = other.mPlugin;
    mFields = other.mFields;
    return *this;
}

void LinearConfig::validate() const
{
    char const* p = mPlugin;
    LinearFields const& f = mFields;
    check(f.inFeatures > 0, p, "field 'in_features' expected > 0, found ", f.inFeatures);
    check(f.outFeatures > 0, p, "field 'out_features' expected > 0, found ", f.outFeatures);
    check(f.numExperts > 0, p, "field 'num_experts' expected > 0, found ", f.numExperts);
    check(f.rank > 0, p, "field 'rank' expected > 0, found ", f.rank);
    check(f.topK >= 1 && f.topK <= f.numExperts, p, "field 'top_k' expected in [1, num_experts=", f.numExperts,
        "], found ", f.topK);
    check(std::isfinite(f.scale), p, "field 'scale' expected a finite float, found ", f.scale);
    check(f.hasBias == 0 || f.hasBias == 1, p, "field 'has_bias' expected 0 or 1, found ", f.hasBias);
    check(f.weightDtype == ADAFUSE_WEIGHT_AS_DTYPE || f.weightDtype == ADAFUSE_WEIGHT_FP8_E4M3, p,
        "field 'weight_dtype' expected 0 (the dtype of x) or 1 (fp8 e4m3), found ", f.weightDtype);
    check(f.weightDtype != ADAFUSE_WEIGHT_FP8_E4M3 || f.inFeatures % 16 == 0, p,
        "field 'in_features' = ", f.inFeatures, " must be a multiple of 16 with weight_dtype 1 (16 FP8 weights per "
        "16-byte load, ADAFUSE_WEIGHT_FP8_E4M3 in adafuse_kernels.h)");
    // The kernel limits (adafuse_kernels.h); AdafuseSwitchLinear runs adafuse_lora_linear for
    // prefill rows, so both plugins have them. Checked here, when the plugin is created from
    // its fields (ONNX attributes or a serialized engine), and again in configurePlugin.
    checkKernelLimits();
    int64_t const wElems = int64_t(f.outFeatures) * f.inFeatures;
    check(wElems <= std::numeric_limits<int32_t>::max(), p, "out_features*in_features = ", wElems,
        " exceeds the int32 element count the kernels index with");
}

void LinearConfig::checkKernelLimits() const
{
    char const* p = mPlugin;
    LinearFields const& f = mFields;
    check(f.topK <= ADAFUSE_MAX_TOP_K, p, "field 'top_k' = ", f.topK, " exceeds the kernel limit ",
        ADAFUSE_MAX_TOP_K, " (ADAFUSE_MAX_TOP_K in adafuse_kernels.h)");
    check(f.numExperts <= ADAFUSE_LORA_MAX_EXPERTS, p, "field 'num_experts' = ", f.numExperts,
        " exceeds the kernel limit ", ADAFUSE_LORA_MAX_EXPERTS, " (ADAFUSE_LORA_MAX_EXPERTS in adafuse_kernels.h)");
    check(f.rank <= ADAFUSE_LORA_MAX_RANK, p, "field 'rank' = ", f.rank, " exceeds the kernel limit ",
        ADAFUSE_LORA_MAX_RANK, " (ADAFUSE_LORA_MAX_RANK in adafuse_kernels.h)");
}

LinearConfig LinearConfig::fromFieldCollection(char const* pluginName, nvinfer1::PluginFieldCollection const* fc)
{
    FieldReader r(pluginName, fc);
    std::vector<std::string> unknown = r.unknownFields({kFIELD_IN_FEATURES, kFIELD_OUT_FEATURES, kFIELD_NUM_EXPERTS,
        kFIELD_RANK, kFIELD_TOP_K, kFIELD_SCALE, kFIELD_HAS_BIAS, kFIELD_WEIGHT_DTYPE});
    for (std::string const& u : unknown)
    {
        logWarning(str(pluginName, ": ignoring unknown field '", u, "'"));
    }
    LinearFields f;
    f.inFeatures = r.getInt32(kFIELD_IN_FEATURES);
    f.outFeatures = r.getInt32(kFIELD_OUT_FEATURES);
    f.numExperts = r.getInt32(kFIELD_NUM_EXPERTS);
    f.rank = r.getInt32(kFIELD_RANK);
    f.topK = r.getInt32(kFIELD_TOP_K);
    f.scale = r.getFloat32(kFIELD_SCALE);
    f.hasBias = r.getInt32(kFIELD_HAS_BIAS);
    // absent: a collection written before the field existed (see kFIELD_WEIGHT_DTYPE)
    f.weightDtype = r.has(kFIELD_WEIGHT_DTYPE) ? r.getInt32(kFIELD_WEIGHT_DTYPE) : ADAFUSE_WEIGHT_AS_DTYPE;
    return LinearConfig(pluginName, f);
}

nvinfer1::PluginFieldCollection const* LinearConfig::fieldNames()
{
    using nvinfer1::PluginField;
    using nvinfer1::PluginFieldType;
    static PluginField const kFields[kNB_FIELDS] = {
        PluginField(kFIELD_IN_FEATURES, nullptr, PluginFieldType::kINT32, 1),
        PluginField(kFIELD_OUT_FEATURES, nullptr, PluginFieldType::kINT32, 1),
        PluginField(kFIELD_NUM_EXPERTS, nullptr, PluginFieldType::kINT32, 1),
        PluginField(kFIELD_RANK, nullptr, PluginFieldType::kINT32, 1),
        PluginField(kFIELD_TOP_K, nullptr, PluginFieldType::kINT32, 1),
        PluginField(kFIELD_SCALE, nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField(kFIELD_HAS_BIAS, nullptr, PluginFieldType::kINT32, 1),
        PluginField(kFIELD_WEIGHT_DTYPE, nullptr, PluginFieldType::kINT32, 1),
    };
    static nvinfer1::PluginFieldCollection const kFc{kNB_FIELDS, kFields};
    return &kFc;
}

nvinfer1::PluginFieldCollection const* LinearConfig::fieldsToSerialize()
{
    using nvinfer1::PluginField;
    using nvinfer1::PluginFieldType;
    mSerial = {
        PluginField(kFIELD_IN_FEATURES, &mFields.inFeatures, PluginFieldType::kINT32, 1),
        PluginField(kFIELD_OUT_FEATURES, &mFields.outFeatures, PluginFieldType::kINT32, 1),
        PluginField(kFIELD_NUM_EXPERTS, &mFields.numExperts, PluginFieldType::kINT32, 1),
        PluginField(kFIELD_RANK, &mFields.rank, PluginFieldType::kINT32, 1),
        PluginField(kFIELD_TOP_K, &mFields.topK, PluginFieldType::kINT32, 1),
        PluginField(kFIELD_SCALE, &mFields.scale, PluginFieldType::kFLOAT32, 1),
        PluginField(kFIELD_HAS_BIAS, &mFields.hasBias, PluginFieldType::kINT32, 1),
        PluginField(kFIELD_WEIGHT_DTYPE, &mFields.weightDtype, PluginFieldType::kINT32, 1),
    };
    mSerialFc.nbFields = kNB_FIELDS;
    mSerialFc.fields = mSerial.data();
    return &mSerialFc;
}

void LinearConfig::outputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const
{
    check(nbInputs == this->nbInputs(), mPlugin, "expected ", this->nbInputs(), " inputs (has_bias=", mFields.hasBias,
        "), found ", nbInputs);
    check(nbOutputs == kNB_OUTPUTS, mPlugin, "expected 1 output, found ", nbOutputs);
    check(outputTypes != nullptr && inputTypes != nullptr, mPlugin, "null type array");
    DataType const t = inputTypes[kINPUT_X];
    check(xTypeAllowed(*this, t), mPlugin, "input 0 (x) expected ", xTypesText(*this), ", found ", dataTypeName(t));
    check(inputTypes[kINPUT_W] == wantedWeightType(*this, t), mPlugin, "input 1 (W) expected ",
        fp8Weights() ? "fp8 (weight_dtype 1)" : "the dtype of x (", fp8Weights() ? "" : dataTypeName(t),
        fp8Weights() ? "" : ")", ", found ", dataTypeName(inputTypes[kINPUT_W]));
    for (int32_t i : {kINPUT_A, kINPUT_B})
    {
        check(inputTypes[i] == t, mPlugin, "input ", i, " (", inputName(i), ") expected the dtype of x (",
            dataTypeName(t), "), found ", dataTypeName(inputTypes[i]));
    }
    if (mFields.hasBias)
    {
        check(inputTypes[kINPUT_BIAS] == t, mPlugin, "input 6 (bias) expected the dtype of x (", dataTypeName(t),
            "), found ", dataTypeName(inputTypes[kINPUT_BIAS]));
    }
    if (fp8Weights())
    {
        check(inputTypes[weightScaleIndex()] == DataType::kFLOAT, mPlugin, "input ", weightScaleIndex(),
            " (weight_scale) expected float32, found ", dataTypeName(inputTypes[weightScaleIndex()]));
    }
    check(inputTypes[kINPUT_EXPERT_IDS] == DataType::kINT32, mPlugin, "input 4 (expert_ids) expected int32, found ",
        dataTypeName(inputTypes[kINPUT_EXPERT_IDS]));
    check(inputTypes[kINPUT_GATES] == DataType::kFLOAT, mPlugin, "input 5 (gates) expected float32, found ",
        dataTypeName(inputTypes[kINPUT_GATES]));
    outputTypes[kOUTPUT_Y] = t;
}

void LinearConfig::outputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) const
{
    check(nbInputs == this->nbInputs(), mPlugin, "expected ", this->nbInputs(), " inputs (has_bias=", mFields.hasBias,
        "), found ", nbInputs);
    check(nbOutputs == kNB_OUTPUTS, mPlugin, "expected 1 output, found ", nbOutputs);
    check(inputs != nullptr && outputs != nullptr, mPlugin, "null shape array");
    nvinfer1::DimsExprs const& x = inputs[kINPUT_X];
    check(x.nbDims >= 1, mPlugin, "input 0 (x) expected at least 1 dimension, found ", x.nbDims);
    nvinfer1::IDimensionExpr const* last = x.d[x.nbDims - 1];
    check(last != nullptr, mPlugin, "input 0 (x) has a null dimension expression");
    check(!last->isConstant() || last->getConstantValue() == mFields.inFeatures, mPlugin,
        "input 0 (x) last dimension expected in_features=", mFields.inFeatures, ", found ",
        last->isConstant() ? last->getConstantValue() : -1);
    for (int32_t i : {kINPUT_EXPERT_IDS, kINPUT_GATES})
    {
        check(inputs[i].nbDims == x.nbDims, mPlugin, "input ", i, " (", inputName(i), ") expected ", x.nbDims,
            " dimensions like x, found ", inputs[i].nbDims);
        nvinfer1::IDimensionExpr const* k = inputs[i].d[inputs[i].nbDims - 1];
        check(k != nullptr && (!k->isConstant() || k->getConstantValue() == mFields.topK), mPlugin, "input ", i, " (",
            inputName(i), ") last dimension expected top_k=", mFields.topK, ", found ",
            (k != nullptr && k->isConstant()) ? k->getConstantValue() : -1);
    }
    nvinfer1::DimsExprs& y = outputs[kOUTPUT_Y];
    y = x;
    y.d[y.nbDims - 1] = exprBuilder.constant(mFields.outFeatures);
    check(y.d[y.nbDims - 1] != nullptr, mPlugin, "IExprBuilder::constant returned null");
}

bool LinearConfig::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) const
{
    check(nbInputs == this->nbInputs(), mPlugin, "expected ", this->nbInputs(), " inputs (has_bias=", mFields.hasBias,
        "), found ", nbInputs);
    check(nbOutputs == kNB_OUTPUTS, mPlugin, "expected 1 output, found ", nbOutputs);
    check(pos >= 0 && pos < nbInputs + nbOutputs, mPlugin, "position ", pos, " out of range [0, ",
        nbInputs + nbOutputs, ")");
    check(inOut != nullptr, mPlugin, "null tensor description array");
    nvinfer1::PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == kINPUT_X)
    {
        return xTypeAllowed(*this, d.type);
    }
    if (pos == kINPUT_W)
    {
        return d.type == wantedWeightType(*this, inOut[kINPUT_X].desc.type);
    }
    if (fp8Weights() && pos == weightScaleIndex())
    {
        return d.type == DataType::kFLOAT;
    }
    if (pos == kINPUT_EXPERT_IDS)
    {
        return d.type == DataType::kINT32;
    }
    if (pos == kINPUT_GATES)
    {
        return d.type == DataType::kFLOAT;
    }
    // A, B, bias and y share the dtype of x (already decided: pos > 0).
    return d.type == inOut[kINPUT_X].desc.type;
}

void LinearConfig::checkTensors(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) const
{
    check(in != nullptr && out != nullptr, mPlugin, "null tensor description array");
    std::vector<TensorView> vi, vo;
    for (int32_t i = 0; i < nbInputs; ++i)
        vi.push_back({in[i].type, in[i].dims, in[i].format});
    for (int32_t i = 0; i < nbOutputs; ++i)
        vo.push_back({out[i].type, out[i].dims, out[i].format});
    checkViews(*this, vi, vo);
}

void LinearConfig::checkTensors(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) const
{
    check(in != nullptr && out != nullptr, mPlugin, "null tensor description array");
    checkKernelLimits();
    std::vector<TensorView> vi, vo;
    for (int32_t i = 0; i < nbInputs; ++i)
        vi.push_back({in[i].desc.type, in[i].desc.dims, in[i].desc.format});
    for (int32_t i = 0; i < nbOutputs; ++i)
        vo.push_back({out[i].desc.type, out[i].desc.dims, out[i].desc.format});
    checkViews(*this, vi, vo);
}

int32_t LinearConfig::rows(nvinfer1::Dims const& x) const
{
    int64_t n = 1;
    for (int32_t a = 0; a + 1 < x.nbDims; ++a)
    {
        check(x.d[a] >= 0, mPlugin, "input 0 (x) has an unresolved dimension ", a, " (shape ", dimsToString(x), ")");
        n *= x.d[a];
        check(n <= std::numeric_limits<int32_t>::max(), mPlugin, "input 0 (x) has more than 2^31-1 rows (shape ",
            dimsToString(x), ")");
    }
    return static_cast<int32_t>(n);
}

int64_t LinearConfig::maxRows(nvinfer1::Dims const& x)
{
    int64_t constexpr kCap = std::numeric_limits<int64_t>::max() / 2;
    int64_t n = 1;
    for (int32_t a = 0; a + 1 < x.nbDims; ++a)
    {
        int64_t const d = std::max<int64_t>(x.d[a], 0);
        n = (d != 0 && n > kCap / d) ? kCap : n * d;
    }
    return n;
}

size_t LinearConfig::loraWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs) const
{
    check(inputs != nullptr && nbInputs == this->nbInputs(), mPlugin, "expected ", this->nbInputs(),
        " inputs, found ", nbInputs);
    int32_t const chunk = static_cast<int32_t>(std::min<int64_t>(maxRows(inputs[kINPUT_X].max), kLORA_CHUNK_ROWS));
    return adafuse_lora_linear_workspace_size(
        chunk, mFields.inFeatures, mFields.outFeatures, mFields.numExperts, mFields.rank, mFields.topK);
}

} // namespace plugin
} // namespace adafuse
