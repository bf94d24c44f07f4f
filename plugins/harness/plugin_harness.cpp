// plugin_harness.cpp - contract harness for libadafuse_trt_plugins.so.
//
// Loads the plugin library with dlopen exactly as TensorRT's
// IPluginRegistry::loadLibrary does (setLoggerFinder, then getCreators) and
// drives every plugin through the IPluginV3 contract without TensorRT:
//   CPU (default; what CI runs): creator names/versions/fields, create from
//     fields, serialize fields and re-create, clone, getOutputDataTypes,
//     getOutputShapes through an IExprBuilder implemented here (constants,
//     symbols, operations), supportsFormatCombination, configurePlugin,
//     getWorkspaceSize, and rejection of bad field values / shapes / dtypes with
//     a logged message naming the plugin and the field or tensor.
//   --gpu: additionally replays TensorRT's documented IPluginV3 lifecycle with the real
//     kernels, for both plugins, float32 / float16 / bfloat16 and three configurations
//     (replayLifecycle; README.md lists the steps and the TensorRT documentation of each):
//     build phase (createPlugin(kBUILD), clone per layer, supportsFormatCombination
//     position by position, configurePlugin once per optimization profile with bounds,
//     getWorkspaceSize, onShapeChange + timing enqueues on uninitialised activations),
//     serialisation (getFieldsToSerialize) and deserialisation (createPlugin(kRUNTIME)),
//     attachToContext for two execution contexts run concurrently on two streams, and a
//     third context whose first enqueues (with the lazy onShapeChange) run under stream
//     capture. Outputs are NaN-poisoned before every enqueue and compared with a float64
//     reference y = W x + b + scale * sum_k g_k B_k A_k x computed here from the same
//     (dtype-rounded) values; every CUDA call's status is checked; W, A, B must stay unchanged.
//     Also: an out-of-range expert id contributes nothing (the release contract).
//     Also: a one-row enqueue whose workspace aliases a buffer that the previous kernel on the
//     stream (a layer that lets dependents launch early, then reads late) still reads; the
//     previous layer must read what it was given (workspaceAliasCase).
//   --gpu --check-expert-ids: sets ADAFUSE_CHECK_EXPERT_IDS=1 before loading the library and
//     checks that an attached plugin's enqueue refuses an out-of-range expert id, naming it,
//     also when it went through a captured graph.
// Exit status: 0 when every check passed, 1 otherwise, 2 on usage/load errors.
//
// Usage: adafuse_plugin_harness [--gpu [--check-expert-ids]] [--lib PATH] [--verbose]

#include "NvInferRuntime.h"
#include "adafuse_kernels.h"

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#ifndef ADAFUSE_PLUGIN_LIBRARY_PATH
#define ADAFUSE_PLUGIN_LIBRARY_PATH "libadafuse_trt_plugins.so"
#endif

using namespace nvinfer1;

namespace
{

// ============================================================================
// Reporting
// ============================================================================
int gPassed = 0;
int gFailed = 0;
bool gVerbose = false;

void expect(bool ok, std::string const& what)
{
    if (ok)
    {
        ++gPassed;
        if (gVerbose)
            std::printf("  ok    %s\n", what.c_str());
    }
    else
    {
        ++gFailed;
        std::printf("  FAIL  %s\n", what.c_str());
    }
}

template <typename... Args>
std::string cat(Args const&... args)
{
    std::ostringstream os;
    (os << ... << args);
    return os.str();
}

// ============================================================================
// Logger handed to the library through setLoggerFinder
// ============================================================================
class HarnessLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        mMessages.emplace_back(severity, msg != nullptr ? msg : "");
        if (gVerbose)
            std::printf("    [plugin log %d] %s\n", static_cast<int>(severity), msg);
    }
    void clear() { mMessages.clear(); }
    //! True when an error was logged that contains every one of `parts`.
    bool hasError(std::vector<std::string> const& parts) const
    {
        for (auto const& m : mMessages)
        {
            if (m.first > Severity::kERROR)
                continue;
            bool all = true;
            for (auto const& p : parts)
                all = all && m.second.find(p) != std::string::npos;
            if (all)
                return true;
        }
        return false;
    }
    bool hasWarning(std::string const& part) const
    {
        for (auto const& m : mMessages)
            if (m.first == Severity::kWARNING && m.second.find(part) != std::string::npos)
                return true;
        return false;
    }
    size_t errorCount() const
    {
        return std::count_if(
            mMessages.begin(), mMessages.end(), [](auto const& m) { return m.first <= Severity::kERROR; });
    }
    std::string lastError() const
    {
        for (auto it = mMessages.rbegin(); it != mMessages.rend(); ++it)
            if (it->first <= Severity::kERROR)
                return it->second;
        return "<no error logged>";
    }

private:
    std::vector<std::pair<Severity, std::string>> mMessages;
};

class HarnessLoggerFinder : public ILoggerFinder
{
public:
    explicit HarnessLoggerFinder(ILogger* logger)
        : mLogger(logger)
    {
    }
    ILogger* findLogger() override { return mLogger; }

private:
    ILogger* mLogger;
};

HarnessLogger gLogger;

//! adafuse_check_runtime as the plugin library sees it (the harness links the same kernels).
struct DriverState
{
    int status{ADAFUSE_OK};
    std::string line;
};
DriverState const& driverState()
{
    static DriverState const kState = [] {
        char line[512] = "";
        int const st = adafuse_check_runtime(line, sizeof(line));
        return DriverState{st, line};
    }();
    return kState;
}

// ============================================================================
// IExprBuilder / IDimensionExpr implemented by the harness
// ============================================================================
class Expr : public IDimensionExpr
{
public:
    enum class Kind { kCONST, kSYMBOL, kOP };

    Expr(Kind kind, int64_t value, DimensionOperation op = DimensionOperation::kSUM, Expr const* a = nullptr,
        Expr const* b = nullptr)
        : mKind(kind)
        , mValue(value)
        , mOp(op)
        , mA(a)
        , mB(b)
        , mImplObj(this)
    {
        mImpl = &mImplObj;
    }
    ~Expr() override = default;

    bool constant() const { return mKind == Kind::kCONST; }
    int64_t value() const { return mValue; }

    //! Value with symbols bound to `symbols[i]`.
    int64_t eval(std::vector<int64_t> const& symbols) const
    {
        switch (mKind)
        {
        case Kind::kCONST: return mValue;
        case Kind::kSYMBOL: return symbols.at(static_cast<size_t>(mValue));
        case Kind::kOP: return apply(mOp, mA->eval(symbols), mB->eval(symbols));
        }
        return 0;
    }

    static int64_t apply(DimensionOperation op, int64_t a, int64_t b)
    {
        switch (op)
        {
        case DimensionOperation::kSUM: return a + b;
        case DimensionOperation::kPROD: return a * b;
        case DimensionOperation::kMAX: return std::max(a, b);
        case DimensionOperation::kMIN: return std::min(a, b);
        case DimensionOperation::kSUB: return a - b;
        case DimensionOperation::kEQUAL: return a == b ? 1 : 0;
        case DimensionOperation::kLESS: return a < b ? 1 : 0;
        case DimensionOperation::kFLOOR_DIV: return b == 0 ? 0 : (a / b - ((a % b != 0) && ((a < 0) != (b < 0))));
        case DimensionOperation::kCEIL_DIV: return b == 0 ? 0 : -((-a) / b - (((-a) % b != 0) && ((-a < 0) != (b < 0))));
        }
        return 0;
    }

private:
    struct Impl : public apiv::VDimensionExpr
    {
        explicit Impl(Expr const* owner)
            : mOwner(owner)
        {
        }
        bool isConstant() const override { return mOwner->constant(); }
        int64_t getConstantValue() const override
        {
            return mOwner->constant() ? mOwner->value() : std::numeric_limits<int64_t>::min();
        }
        bool isSizeTensor() const override { return false; }
        Expr const* mOwner;
    };

    Kind mKind;
    int64_t mValue; // constant value or symbol index
    DimensionOperation mOp;
    Expr const* mA;
    Expr const* mB;
    Impl mImplObj;
};

class ExprBuilder : public IExprBuilder
{
public:
    ExprBuilder()
        : mImplObj(this)
    {
        mImpl = &mImplObj;
    }
    ~ExprBuilder() override = default;

    Expr const* makeConstant(int64_t v) { return add(std::make_unique<Expr>(Expr::Kind::kCONST, v)); }
    Expr const* symbol(int64_t index) { return add(std::make_unique<Expr>(Expr::Kind::kSYMBOL, index)); }
    Expr const* makeOperation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b)
    {
        auto const& ea = static_cast<Expr const&>(a);
        auto const& eb = static_cast<Expr const&>(b);
        if (ea.constant() && eb.constant())
            return makeConstant(Expr::apply(op, ea.value(), eb.value()));
        return add(std::make_unique<Expr>(Expr::Kind::kOP, 0, op, &ea, &eb));
    }
    bool owns(IDimensionExpr const* e) const
    {
        for (auto const& n : mNodes)
            if (n.get() == e)
                return true;
        return false;
    }

private:
    Expr const* add(std::unique_ptr<Expr> e)
    {
        mNodes.push_back(std::move(e));
        return mNodes.back().get();
    }
    struct Impl : public apiv::VExprBuilder
    {
        explicit Impl(ExprBuilder* owner)
            : mOwner(owner)
        {
        }
        IDimensionExpr const* constant(int64_t value) override { return mOwner->makeConstant(value); }
        IDimensionExpr const* operation(
            DimensionOperation op, IDimensionExpr const& first, IDimensionExpr const& second) override
        {
            return mOwner->makeOperation(op, first, second);
        }
        IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
        {
            return nullptr; // the adafuse plugins have no size tensors
        }
        ExprBuilder* mOwner;
    };
    std::vector<std::unique_ptr<Expr>> mNodes;
    Impl mImplObj;
};

class HarnessResourceContext : public IPluginResourceContext
{
public:
    IGpuAllocator* getGpuAllocator() const noexcept override { return nullptr; }
    IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
};

// ============================================================================
// Fields
// ============================================================================
struct Cfg
{
    int32_t in, out, experts, rank, topK;
    float scale;
    int32_t hasBias;
    int32_t weightDtype{0}; // 1: W float8 e4m3 with a float32 weight_scale input after the bias
    bool fp8() const { return weightDtype == 1; }
    int32_t nbInputs() const { return 6 + hasBias + (fp8() ? 1 : 0); }
    std::string str() const
    {
        return cat("in=", in, " out=", out, " E=", experts, " r=", rank, " k=", topK, " scale=", scale,
            " bias=", hasBias, fp8() ? " W=fp8" : "");
    }
};

constexpr int kNbFields = 8;
char const* const kFieldNames[kNbFields]
    = {"in_features", "out_features", "num_experts", "rank", "top_k", "scale", "has_bias", "weight_dtype"};
PluginFieldType const kFieldTypes[kNbFields] = {PluginFieldType::kINT32, PluginFieldType::kINT32,
    PluginFieldType::kINT32, PluginFieldType::kINT32, PluginFieldType::kINT32, PluginFieldType::kFLOAT32,
    PluginFieldType::kINT32, PluginFieldType::kINT32};

//! Owns field storage and a PluginFieldCollection over it.
struct Fields
{
    explicit Fields(Cfg const& c)
    {
        ints = {c.in, c.out, c.experts, c.rank, c.topK, c.hasBias, c.weightDtype};
        scale = c.scale;
        for (int i = 0; i < kNbFields; ++i)
        {
            void const* data = i == 5 ? static_cast<void const*>(&scale)
                                      : static_cast<void const*>(&ints[static_cast<size_t>(i < 5 ? i : i - 1)]);
            list.emplace_back(kFieldNames[i], data, kFieldTypes[i], 1);
        }
    }
    PluginFieldCollection const* fc()
    {
        coll.nbFields = static_cast<int32_t>(list.size());
        coll.fields = list.data();
        return &coll;
    }
    std::vector<int32_t> ints;
    float scale;
    std::vector<PluginField> list;
    PluginFieldCollection coll{};
    // extra storage for tampered fields
    std::vector<std::unique_ptr<std::vector<char>>> extra;
    void const* keep(void const* p, size_t n)
    {
        extra.push_back(std::make_unique<std::vector<char>>(static_cast<char const*>(p), static_cast<char const*>(p) + n));
        return extra.back()->data();
    }
};

//! Reads the fields of a collection back into a Cfg (false if anything is off).
bool readFields(PluginFieldCollection const* fc, Cfg& out, std::string& why)
{
    if (fc == nullptr)
    {
        why = "null collection";
        return false;
    }
    int found = 0;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        for (int j = 0; j < kNbFields; ++j)
        {
            if (f.name != nullptr && std::strcmp(f.name, kFieldNames[j]) == 0)
            {
                if (f.type != kFieldTypes[j] || f.length != 1 || f.data == nullptr)
                {
                    why = cat("field ", f.name, " has type ", static_cast<int>(f.type), " length ", f.length);
                    return false;
                }
                ++found;
                if (j == 5)
                    out.scale = *static_cast<float const*>(f.data);
                else
                {
                    int32_t v = *static_cast<int32_t const*>(f.data);
                    int32_t* dst[] = {
                        &out.in, &out.out, &out.experts, &out.rank, &out.topK, nullptr, &out.hasBias, &out.weightDtype};
                    *dst[j] = v;
                }
            }
        }
    }
    if (found != kNbFields || fc->nbFields != kNbFields)
    {
        why = cat("expected the ", kNbFields, " fields, found ", found, " known of ", fc->nbFields);
        return false;
    }
    return true;
}

bool sameCfg(Cfg const& a, Cfg const& b)
{
    return a.in == b.in && a.out == b.out && a.experts == b.experts && a.rank == b.rank && a.topK == b.topK
        && a.hasBias == b.hasBias && a.weightDtype == b.weightDtype && std::memcmp(&a.scale, &b.scale, sizeof(float)) == 0;
}

// ============================================================================
// Library access
// ============================================================================
using GetCreatorsFn = IPluginCreatorInterface* const* (*) (int32_t&);
using SetLoggerFinderFn = void (*)(ILoggerFinder*);

std::map<std::string, IPluginCreatorV3One*> gCreators;

struct PluginDeleter
{
    void operator()(IPluginV3* p) const { delete p; }
};
using PluginPtr = std::unique_ptr<IPluginV3, PluginDeleter>;

IPluginV3OneCore* core(IPluginV3* p)
{
    return static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
}
IPluginV3OneBuild* build(IPluginV3* p)
{
    return static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
}
IPluginV3OneRuntime* runtime(IPluginV3* p)
{
    return static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}

PluginPtr create(std::string const& name, PluginFieldCollection const* fc, TensorRTPhase phase = TensorRTPhase::kBUILD)
{
    return PluginPtr(gCreators.at(name)->createPlugin(name.c_str(), fc, phase));
}

// ============================================================================
// Tensor descriptions
// ============================================================================
Dims dims(std::vector<int64_t> const& v)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    for (size_t i = 0; i < v.size(); ++i)
        d.d[i] = v[i];
    return d;
}

//! Shapes of every input and the output for leading dims `lead`.
struct Shapes
{
    std::vector<Dims> in;
    Dims out;
};

Shapes shapesFor(Cfg const& c, std::vector<int64_t> const& lead)
{
    auto withLast = [&](int64_t last) {
        std::vector<int64_t> v = lead;
        v.push_back(last);
        return dims(v);
    };
    Shapes s;
    s.in = {withLast(c.in), dims({c.out, c.in}), dims({c.experts, c.rank, c.in}), dims({c.experts, c.out, c.rank}),
        withLast(c.topK), withLast(c.topK)};
    if (c.hasBias)
        s.in.push_back(dims({c.out}));
    if (c.fp8())
        s.in.push_back(dims({c.out})); // weight_scale
    s.out = withLast(c.out);
    return s;
}

std::vector<DataType> typesFor(Cfg const& c, DataType t)
{
    std::vector<DataType> v = {t, c.fp8() ? DataType::kFP8 : t, t, t, DataType::kINT32, DataType::kFLOAT};
    if (c.hasBias)
        v.push_back(t);
    if (c.fp8())
        v.push_back(DataType::kFLOAT);
    return v;
}

//! The float types x may have: 16-bit only with FP8 W.
std::vector<DataType> xTypes(Cfg const& c)
{
    if (c.fp8())
        return {DataType::kHALF, DataType::kBF16};
    return {DataType::kFLOAT, DataType::kHALF, DataType::kBF16};
}

PluginTensorDesc desc(Dims const& d, DataType t)
{
    PluginTensorDesc p{};
    p.dims = d;
    p.type = t;
    p.format = TensorFormat::kLINEAR;
    p.scale = -1.F;
    return p;
}

DynamicPluginTensorDesc dynDesc(Dims const& d, Dims const& mn, Dims const& mx, DataType t)
{
    DynamicPluginTensorDesc p{};
    p.desc = desc(d, t);
    p.min = mn;
    p.max = mx;
    p.opt = mx;
    return p;
}

char const* typeName(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kBF16: return "bfloat16";
    case DataType::kINT32: return "int32";
    case DataType::kINT8: return "int8";
    case DataType::kINT64: return "int64";
    case DataType::kFP8: return "fp8";
    default: return "other";
    }
}

// ============================================================================
// CPU checks
// ============================================================================
std::vector<std::string> const kPluginNames = {"AdafuseLoraLinear", "AdafuseSwitchLinear"};
constexpr int32_t kINPUT_EXPERT_IDS_POS = 4; // tensor positions of the plugin contract
constexpr int32_t kINPUT_GATES_POS = 5;

std::vector<Cfg> cpuConfigs(std::string const& name)
{
    std::vector<Cfg> v = {{64, 48, 4, 8, 2, 2.0F, 1}, {100, 70, 3, 4, 1, 0.5F, 0}, {32, 32, 8, 16, 8, 0.25F, 1}};
    if (name == "AdafuseLoraLinear") // FP8 W (weight_dtype 1), with and without bias; the switch refuses it
    {
        v.push_back({64, 48, 4, 8, 2, 2.0F, 1, 1});
        v.push_back({32, 32, 8, 16, 8, 0.25F, 0, 1});
    }
    return v;
}

void checkCreators(void* lib)
{
    std::printf("[creators]\n");
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinderFn>(dlsym(lib, "setLoggerFinder"));
    auto getCreators = reinterpret_cast<GetCreatorsFn>(dlsym(lib, "getCreators"));
    expect(setLoggerFinder != nullptr, "library exports setLoggerFinder");
    expect(getCreators != nullptr, "library exports getCreators");
    if (setLoggerFinder == nullptr || getCreators == nullptr)
        return;
    static HarnessLoggerFinder finder(&gLogger);
    setLoggerFinder(&finder);
    int32_t n = -1;
    gLogger.clear();
    IPluginCreatorInterface* const* creators = getCreators(n);
    expect(creators != nullptr && n == 2, cat("getCreators returns 2 creators (found ", n, ")"));
    // The driver floor is reported once, through TensorRT's logger, when the creators are handed out.
    DriverState const& d = driverState();
    if (d.status == ADAFUSE_OK)
        expect(gLogger.errorCount() == 0 && !gLogger.hasWarning("driver"),
            cat("getCreators logs nothing about a new enough driver (", d.line, ")"));
    else if (d.status == ADAFUSE_ERR_NO_DRIVER)
        expect(gLogger.hasWarning(d.line) && d.line.rfind("no CUDA driver found: ", 0) == 0,
            cat("getCreators warns '", d.line, "'"));
    else
        expect(gLogger.hasError({d.line}), cat("getCreators logs the error '", d.line, "'"));
    for (int32_t i = 0; creators != nullptr && i < n; ++i)
    {
        InterfaceInfo info = creators[i]->getInterfaceInfo();
        bool v3 = std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0 && info.major == 1;
        expect(v3, cat("creator ", i, " is an IPluginCreatorV3One (kind '", info.kind, "' ", info.major, ".",
                          info.minor, ")"));
        if (!v3)
            continue;
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        std::string name = c->getPluginName();
        expect(std::string(c->getPluginVersion()) == "1", cat(name, " creator version is \"1\""));
        expect(std::string(c->getPluginNamespace()).empty(), cat(name, " creator namespace is \"\""));
        gCreators[name] = c;
        PluginFieldCollection const* fn = c->getFieldNames();
        bool fieldsOk = fn != nullptr && fn->nbFields == kNbFields;
        for (int j = 0; fieldsOk && j < kNbFields; ++j)
            fieldsOk = std::strcmp(fn->fields[j].name, kFieldNames[j]) == 0 && fn->fields[j].type == kFieldTypes[j]
                && fn->fields[j].length == 1;
        expect(fieldsOk, cat(name, " getFieldNames lists in_features..weight_dtype with kINT32/kFLOAT32 types"));
    }
    for (auto const& n2 : kPluginNames)
        expect(gCreators.count(n2) == 1, cat("creator ", n2, " is registered"));
}

void checkBadFields(std::string const& name)
{
    std::printf("[%s: bad fields]\n", name.c_str());
    Cfg const good{64, 48, 4, 8, 2, 2.0F, 1};
    struct Case
    {
        std::string what;
        std::function<void(Fields&)> tamper;
        std::vector<std::string> mustMention;
    };
    float const nan = std::numeric_limits<float>::quiet_NaN();
    float const inf = std::numeric_limits<float>::infinity();
    static int64_t const big = int64_t(1) << 40;
    static double const d05 = 0.5;
    std::vector<Case> cases = {
        {"in_features=0", [](Fields& f) { f.ints[0] = 0; }, {"in_features", "> 0", "found 0"}},
        {"out_features=-3", [](Fields& f) { f.ints[1] = -3; }, {"out_features", "found -3"}},
        {"num_experts=0", [](Fields& f) { f.ints[2] = 0; }, {"num_experts", "found 0"}},
        {"rank=0", [](Fields& f) { f.ints[3] = 0; }, {"rank", "found 0"}},
        {"top_k=0", [](Fields& f) { f.ints[4] = 0; }, {"top_k", "found 0"}},
        {"top_k>num_experts", [](Fields& f) { f.ints[4] = 5; }, {"top_k", "num_experts=4", "found 5"}},
        {"scale=NaN", [nan](Fields& f) { f.scale = nan; }, {"scale", "finite"}},
        {"scale=inf", [inf](Fields& f) { f.scale = inf; }, {"scale", "finite"}},
        {"has_bias=2", [](Fields& f) { f.ints[5] = 2; }, {"has_bias", "0 or 1", "found 2"}},
        {"rank missing", [](Fields& f) { f.list.erase(f.list.begin() + 3); }, {"rank", "missing"}},
        {"in_features as float",
            [](Fields& f) { f.list[0] = PluginField("in_features", &f.scale, PluginFieldType::kFLOAT32, 1); },
            {"in_features", "integer", "kFLOAT32"}},
        {"scale as int32",
            [](Fields& f) { f.list[5] = PluginField("scale", &f.ints[0], PluginFieldType::kINT32, 1); },
            {"scale", "float", "kINT32"}},
        {"top_k length 2",
            [](Fields& f) { f.list[4] = PluginField("top_k", f.ints.data(), PluginFieldType::kINT32, 2); },
            {"top_k", "length 2"}},
        {"in_features int64 2^40",
            [](Fields& f) { f.list[0] = PluginField("in_features", &big, PluginFieldType::kINT64, 1); },
            {"in_features", "int32"}},
        {"rank given twice", [](Fields& f) { f.list.push_back(f.list[3]); }, {"rank", "more than once"}},
        // The kernel limits of adafuse_kernels.h, named with the value found and the limit.
        {"top_k=9 > ADAFUSE_MAX_TOP_K", [](Fields& f) { f.ints[2] = 16; f.ints[4] = 9; },
            {"field 'top_k' = 9", "kernel limit 8", "ADAFUSE_MAX_TOP_K"}},
        {"num_experts=257 > ADAFUSE_LORA_MAX_EXPERTS", [](Fields& f) { f.ints[2] = 257; },
            {"field 'num_experts' = 257", "kernel limit 256", "ADAFUSE_LORA_MAX_EXPERTS"}},
        {"rank=4097 > ADAFUSE_LORA_MAX_RANK", [](Fields& f) { f.ints[3] = 4097; },
            {"field 'rank' = 4097", "kernel limit 4096", "ADAFUSE_LORA_MAX_RANK"}},
        {"weight_dtype=2", [](Fields& f) { f.ints[6] = 2; }, {"field 'weight_dtype'", "found 2"}},
        {"weight_dtype=1 with in_features=40", [](Fields& f) { f.ints[6] = 1; f.ints[0] = 40; },
            {"field 'in_features' = 40", "multiple of 16", "weight_dtype 1"}},
    };
    if (name == "AdafuseSwitchLinear")
        cases.push_back({"weight_dtype=1 (this plugin takes W in the dtype of x only)",
            [](Fields& f) { f.ints[6] = 1; }, {"field 'weight_dtype' = 1", "AdafuseLoraLinear"}});
    for (auto const& cs : cases)
    {
        Fields f(good);
        cs.tamper(f);
        gLogger.clear();
        PluginPtr p = create(name, f.fc());
        std::vector<std::string> parts = cs.mustMention;
        parts.insert(parts.begin(), name);
        bool rejected = p == nullptr;
        bool mentioned = gLogger.hasError(parts);
        expect(rejected && mentioned,
            cat(name, " rejects ", cs.what, rejected ? "" : " (NOT rejected)",
                mentioned ? "" : cat(" (message lacks expected text; last error: ", gLogger.lastError(), ")")));
        if (gVerbose && rejected)
            std::printf("        message: %s\n", gLogger.lastError().c_str());
    }
    // Accepted variations: int64 / float64 encodings, unknown extra field (warned about).
    {
        Fields f(good);
        static int64_t const in64 = 64;
        f.list[0] = PluginField("in_features", &in64, PluginFieldType::kINT64, 1);
        f.list[5] = PluginField("scale", &d05, PluginFieldType::kFLOAT64, 1);
        gLogger.clear();
        PluginPtr p = create(name, f.fc());
        Cfg back{};
        std::string why;
        bool ok = p != nullptr && readFields(runtime(p.get())->getFieldsToSerialize(), back, why) && back.in == 64
            && back.scale == 0.5F;
        expect(ok, cat(name, " accepts in_features as kINT64 and scale as kFLOAT64 ", why));
    }
    // Serialized before weight_dtype existed (7 fields): created as weight_dtype 0, serialized with all 8.
    {
        Fields f(good);
        f.list.pop_back();
        gLogger.clear();
        PluginPtr p = create(name, f.fc(), TensorRTPhase::kRUNTIME);
        Cfg back{};
        std::string why;
        bool ok = p != nullptr && readFields(runtime(p.get())->getFieldsToSerialize(), back, why) && sameCfg(back, good)
            && back.weightDtype == 0;
        expect(ok && !gLogger.hasWarning("weight_dtype"),
            cat(name, " reads 7 fields (no weight_dtype) as weight_dtype 0 and serializes all 8 ", why));
    }
    {
        Fields f(good);
        static int32_t const extra = 7;
        f.list.emplace_back("bogus_field", &extra, PluginFieldType::kINT32, 1);
        gLogger.clear();
        PluginPtr p = create(name, f.fc());
        expect(p != nullptr && gLogger.hasWarning("bogus_field"),
            cat(name, " creates with an unknown field and warns about it"));
    }
    {
        gLogger.clear();
        PluginPtr p = create(name, nullptr);
        expect(p == nullptr && gLogger.hasError({name, "null"}), cat(name, " rejects a null field collection"));
    }
}

void checkShapes(std::string const& name, IPluginV3OneBuild* b, Cfg const& c)
{
    // x [S0, S1, in] with symbolic S0, S1.
    for (int rank : {1, 2, 3})
    {
        ExprBuilder eb;
        std::vector<IDimensionExpr const*> lead;
        for (int a = 0; a + 1 < rank; ++a)
            lead.push_back(eb.symbol(a));
        auto mk = [&](int64_t last) {
            DimsExprs d{};
            d.nbDims = rank;
            for (int a = 0; a + 1 < rank; ++a)
                d.d[a] = lead[static_cast<size_t>(a)];
            d.d[rank - 1] = eb.makeConstant(last);
            return d;
        };
        auto mkc = [&](std::vector<int64_t> const& v) {
            DimsExprs d{};
            d.nbDims = static_cast<int32_t>(v.size());
            for (size_t i = 0; i < v.size(); ++i)
                d.d[i] = eb.makeConstant(v[i]);
            return d;
        };
        std::vector<DimsExprs> in = {mk(c.in), mkc({c.out, c.in}), mkc({c.experts, c.rank, c.in}),
            mkc({c.experts, c.out, c.rank}), mk(c.topK), mk(c.topK)};
        if (c.hasBias)
            in.push_back(mkc({c.out}));
        if (c.fp8())
            in.push_back(mkc({c.out})); // weight_scale
        DimsExprs out[1]{};
        gLogger.clear();
        int32_t rc = b->getOutputShapes(in.data(), c.nbInputs(), nullptr, 0, out, 1, eb);
        bool ok = rc == 0 && out[0].nbDims == rank;
        std::vector<int64_t> binding = {3, 5};
        for (int a = 0; ok && a < rank; ++a)
            ok = out[0].d[a] != nullptr && eb.owns(out[0].d[a]);
        for (int a = 0; ok && a + 1 < rank; ++a)
            ok = static_cast<Expr const*>(out[0].d[a])->eval(binding) == binding[static_cast<size_t>(a)];
        ok = ok && out[0].d[rank - 1]->isConstant() && out[0].d[rank - 1]->getConstantValue() == c.out;
        expect(ok, cat(name, " getOutputShapes rank-", rank, " x -> [..., out_features=", c.out, "] (rc ", rc, ")"));

        // wrong in_features in x
        in[0] = mk(c.in + 1);
        gLogger.clear();
        rc = b->getOutputShapes(in.data(), c.nbInputs(), nullptr, 0, out, 1, eb);
        expect(rc != 0 && gLogger.hasError({name, "input 0 (x)", "in_features"}),
            cat(name, " getOutputShapes rejects x last dim in_features+1"));
        in[0] = mk(c.in);
        // wrong top_k in expert_ids
        in[4] = mk(c.topK + 1);
        gLogger.clear();
        rc = b->getOutputShapes(in.data(), c.nbInputs(), nullptr, 0, out, 1, eb);
        expect(rc != 0 && gLogger.hasError({name, "expert_ids", "top_k"}),
            cat(name, " getOutputShapes rejects expert_ids last dim top_k+1"));
        in[4] = mk(c.topK);
        // wrong input count
        gLogger.clear();
        rc = b->getOutputShapes(in.data(), c.nbInputs() - 1, nullptr, 0, out, 1, eb);
        expect(rc != 0 && gLogger.hasError({name, "inputs"}), cat(name, " getOutputShapes rejects a missing input"));
    }
}

void checkTypes(std::string const& name, IPluginV3OneBuild* b, Cfg const& c)
{
    for (DataType t : xTypes(c))
    {
        std::vector<DataType> in = typesFor(c, t);
        DataType out[1] = {DataType::kINT8};
        gLogger.clear();
        int32_t rc = b->getOutputDataTypes(out, 1, in.data(), c.nbInputs());
        expect(rc == 0 && out[0] == t, cat(name, " getOutputDataTypes(", typeName(t), ") = ", typeName(t)));
    }
    struct Bad
    {
        int pos;
        DataType t;
        std::string mention;
    };
    std::vector<Bad> bads{{0, DataType::kINT32, "input 0 (x)"}, {1, DataType::kHALF, "input 1 (W)"},
        {4, DataType::kINT64, "input 4 (expert_ids)"}, {5, DataType::kHALF, "input 5 (gates)"}};
    if (c.fp8()) // W must be fp8, x 16-bit, weight_scale float32
        bads = {{1, DataType::kBF16, "input 1 (W)"}, {0, DataType::kFLOAT, "input 0 (x)"},
            {c.nbInputs() - 1, DataType::kHALF, "(weight_scale)"}, {5, DataType::kHALF, "input 5 (gates)"}};
    for (Bad const& bad : bads)
    {
        std::vector<DataType> in = typesFor(c, c.fp8() ? DataType::kHALF : DataType::kFLOAT);
        if (c.fp8() && bad.pos == 0) // x float32 with W fp8 and the rest float32 too
            in = typesFor(c, DataType::kFLOAT);
        in[static_cast<size_t>(bad.pos)] = bad.t;
        DataType out[1];
        gLogger.clear();
        int32_t rc = b->getOutputDataTypes(out, 1, in.data(), c.nbInputs());
        expect(rc != 0 && gLogger.hasError({name, bad.mention, typeName(bad.t)}),
            cat(name, " getOutputDataTypes rejects ", bad.mention, " as ", typeName(bad.t)));
    }
}

void checkFormats(std::string const& name, IPluginV3OneBuild* b, Cfg const& c)
{
    std::vector<DataType> const candidates = {DataType::kFLOAT, DataType::kHALF, DataType::kBF16, DataType::kINT32,
        DataType::kINT8, DataType::kINT64, DataType::kFP8};
    int32_t const nbIn = c.nbInputs();
    Shapes s = shapesFor(c, {2});
    bool allOk = true;
    std::string firstBad;
    std::vector<DataType> const xs = xTypes(c);
    for (DataType t : xs)
    {
        std::vector<DataType> want = typesFor(c, t);
        want.push_back(t); // output
        std::vector<DynamicPluginTensorDesc> io;
        for (int32_t i = 0; i < nbIn; ++i)
            io.push_back(dynDesc(s.in[static_cast<size_t>(i)], s.in[static_cast<size_t>(i)],
                s.in[static_cast<size_t>(i)], want[static_cast<size_t>(i)]));
        io.push_back(dynDesc(s.out, s.out, s.out, t));
        for (int32_t pos = 0; pos < nbIn + 1; ++pos)
        {
            DataType keep = io[static_cast<size_t>(pos)].desc.type;
            for (DataType cand : candidates)
            {
                io[static_cast<size_t>(pos)].desc.type = cand;
                bool expected = cand == want[static_cast<size_t>(pos)];
                if (pos == 0) // x itself: any of its float types
                    expected = std::find(xs.begin(), xs.end(), cand) != xs.end();
                bool got = b->supportsFormatCombination(pos, io.data(), nbIn, 1);
                if (got != expected && allOk)
                {
                    allOk = false;
                    firstBad = cat("x=", typeName(t), " pos ", pos, " type ", typeName(cand), " expected ", expected);
                }
            }
            io[static_cast<size_t>(pos)].desc.type = keep;
            io[static_cast<size_t>(pos)].desc.format = TensorFormat::kCHW32;
            if (b->supportsFormatCombination(pos, io.data(), nbIn, 1) && allOk)
            {
                allOk = false;
                firstBad = cat("pos ", pos, " accepts kCHW32");
            }
            io[static_cast<size_t>(pos)].desc.format = TensorFormat::kLINEAR;
        }
    }
    expect(allOk, cat(name, " supportsFormatCombination: linear only; ",
                      c.fp8() ? "x float16/bfloat16; W fp8; weight_scale float32; A, B, bias, y = dtype of x; "
                              : "x float32/float16/bfloat16; W, A, B, bias, y = dtype of x; ",
                      "expert_ids int32; gates float32 ", firstBad));
}

void checkConfigureAndWorkspace(std::string const& name, IPluginV3OneBuild* b, Cfg const& c)
{
    // Profile: x [-1, -1, in] with min [1,1,in], max [4, 32, in].
    Shapes dyn = shapesFor(c, {-1, -1});
    Shapes mn = shapesFor(c, {1, 1});
    Shapes mx = shapesFor(c, {4, 32});
    std::vector<DataType> types = typesFor(c, DataType::kHALF);
    std::vector<DynamicPluginTensorDesc> in;
    for (size_t i = 0; i < types.size(); ++i)
        in.push_back(dynDesc(dyn.in[i], mn.in[i], mx.in[i], types[i]));
    DynamicPluginTensorDesc out = dynDesc(dyn.out, mn.out, mx.out, DataType::kHALF);
    gLogger.clear();
    int32_t rc = b->configurePlugin(in.data(), c.nbInputs(), &out, 1);
    expect(rc == 0, cat(name, " configurePlugin accepts a dynamic profile (rc ", rc, ") ", gLogger.lastError()));

    size_t ws = b->getWorkspaceSize(in.data(), c.nbInputs(), &out, 1);
    size_t want = adafuse_lora_linear_workspace_size(4 * 32, c.in, c.out, c.experts, c.rank, c.topK);
    expect(ws == want, cat(name, " getWorkspaceSize(max rows 128) = adafuse_lora_linear_workspace_size = ", want,
                           " (got ", ws, ")"));

    // Bounds are bounds (TensorRT derives them per tensor): a Reshape between the pre-gate and the
    // plugin can give expert_ids / gates a looser max than x; configurePlugin must accept that.
    {
        std::vector<DynamicPluginTensorDesc> loose = in;
        for (int32_t i : {4, 5})
        {
            loose[static_cast<size_t>(i)].max.d[0] = 16;  // x's max is [4, 32, in]
            loose[static_cast<size_t>(i)].max.d[1] = 64;
            loose[static_cast<size_t>(i)].min.d[0] = 0;
        }
        gLogger.clear();
        rc = b->configurePlugin(loose.data(), c.nbInputs(), &out, 1);
        expect(rc == 0, cat(name, " configurePlugin accepts expert_ids/gates bounds looser than x's (rc ", rc, ") ",
                            rc == 0 ? "" : gLogger.lastError()));
    }
    // A long-prefill profile: the workspace holds one chunk of kLORA_CHUNK_ROWS = 2048 rows.
    {
        Shapes big = shapesFor(c, {2, 3000});
        std::vector<DynamicPluginTensorDesc> inBig;
        for (size_t i = 0; i < types.size(); ++i)
            inBig.push_back(dynDesc(dyn.in[i], mn.in[i], big.in[i], types[i]));
        DynamicPluginTensorDesc outBig = dynDesc(dyn.out, mn.out, big.out, DataType::kHALF);
        gLogger.clear();
        rc = b->configurePlugin(inBig.data(), c.nbInputs(), &outBig, 1);
        size_t const wsBig = b->getWorkspaceSize(inBig.data(), c.nbInputs(), &outBig, 1);
        size_t const wantBig = adafuse_lora_linear_workspace_size(2048, c.in, c.out, c.experts, c.rank, c.topK);
        expect(rc == 0 && wsBig == wantBig,
            cat(name, " profile of 6000 rows: configurePlugin ok and getWorkspaceSize = one 2048-row chunk = ", wantBig,
                " (got ", wsBig, ", rc ", rc, ")"));
    }

    // Decode-only profile (max rows 1).
    Shapes one = shapesFor(c, {1, 1});
    std::vector<DynamicPluginTensorDesc> in1;
    for (size_t i = 0; i < types.size(); ++i)
        in1.push_back(dynDesc(one.in[i], one.in[i], one.in[i], types[i]));
    DynamicPluginTensorDesc out1 = dynDesc(one.out, one.out, one.out, DataType::kHALF);
    size_t ws1 = b->getWorkspaceSize(in1.data(), c.nbInputs(), &out1, 1);
    size_t want1 = name == "AdafuseSwitchLinear"
        ? 0
        : adafuse_lora_linear_workspace_size(1, c.in, c.out, c.experts, c.rank, c.topK);
    expect(ws1 == want1, cat(name, " getWorkspaceSize(max rows 1) = ", want1, " (got ", ws1, ")"));

    // Wrong static dims / dtype mismatches must fail with a message naming the tensor.
    struct Bad
    {
        std::string what;
        std::function<void(std::vector<DynamicPluginTensorDesc>&)> tamper;
        std::vector<std::string> mention;
    };
    std::vector<Bad> bads = {
        {"W [out+1, in]", [&](auto& v) { v[1].desc.dims.d[0] = c.out + 1; v[1].max.d[0] = c.out + 1; },
            {"input 1 (W)", "out_features"}},
        {"A [E, rank+1, in]", [&](auto& v) { v[2].desc.dims.d[1] = c.rank + 1; v[2].max.d[1] = c.rank + 1; },
            {"input 2 (A)", "rank"}},
        {"B [E+1, out, rank]", [&](auto& v) { v[3].desc.dims.d[0] = c.experts + 1; v[3].max.d[0] = c.experts + 1; },
            {"input 3 (B)", "num_experts"}},
        {"gates float16", [&](auto& v) { v[5].desc.type = DataType::kHALF; }, {"input 5 (gates)", "float32"}},
        {"A float32 with x float16", [&](auto& v) { v[2].desc.type = DataType::kFLOAT; }, {"input 2 (A)", "dtype of x"}},
        {"expert_ids rank 2", [&](auto& v) { v[4].desc.dims.nbDims = 2; v[4].max.nbDims = 2; },
            {"input 4 (expert_ids)", "dimensions"}},
        {"static leading dim of gates differs from x",
            [&](auto& v) { v[0].desc.dims.d[0] = 2; v[5].desc.dims.d[0] = 3; }, {"input 5 (gates)", "leading dimension"}},
        {"A with 300 experts (kernel limit 256)",
            [&](auto& v) { v[2].desc.dims.d[0] = 300; v[2].max.d[0] = 300; v[2].min.d[0] = 300; },
            {"input 2 (A) dimension 0 (num_experts) = 300", "kernel limit 256", "ADAFUSE_LORA_MAX_EXPERTS"}},
        {"expert_ids last dim 9 (kernel limit 8)",
            [&](auto& v) { v[4].desc.dims.d[2] = 9; v[4].max.d[2] = 9; v[4].min.d[2] = 9; },
            {"input 4 (expert_ids) dimension 2 (top_k) = 9", "kernel limit 8", "ADAFUSE_MAX_TOP_K"}},
    };
    if (c.fp8())
    {
        int32_t const s = c.nbInputs() - 1;
        bads.push_back({"weight_scale [out+1]", [&, s](auto& v) {
                            v[static_cast<size_t>(s)].desc.dims.d[0] = c.out + 1;
                            v[static_cast<size_t>(s)].max.d[0] = c.out + 1;
                        },
            {cat("input ", s, " (weight_scale)"), "out_features"}});
        bads.push_back({"W float16 (weight_dtype 1)", [&](auto& v) { v[1].desc.type = DataType::kHALF; },
            {"input 1 (W)", "fp8"}});
    }
    for (auto const& bad : bads)
    {
        std::vector<DynamicPluginTensorDesc> v = in;
        bad.tamper(v);
        gLogger.clear();
        rc = b->configurePlugin(v.data(), c.nbInputs(), &out, 1);
        std::vector<std::string> parts = bad.mention;
        parts.insert(parts.begin(), name);
        expect(rc != 0 && gLogger.hasError(parts),
            cat(name, " configurePlugin rejects ", bad.what, rc != 0 ? "" : " (accepted!)", " last error: ",
                gLogger.lastError()));
    }
}

bool haveGpu()
{
    static bool const kHave = [] {
        int n = 0;
        return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
    }();
    return kHave;
}

void checkPlugin(std::string const& name, Cfg const& c)
{
    std::printf("[%s: %s]\n", name.c_str(), c.str().c_str());
    Fields f(c);
    gLogger.clear();
    PluginPtr p = create(name, f.fc(), TensorRTPhase::kBUILD);
    expect(p != nullptr, cat(name, " createPlugin(kBUILD) from fields ", p ? "" : gLogger.lastError()));
    if (!p)
        return;
    InterfaceInfo info = p->getInterfaceInfo();
    expect(std::strcmp(info.kind, "PLUGIN") == 0 && info.major == 1, cat(name, " is an IPluginV3"));
    IPluginV3OneCore* co = core(p.get());
    IPluginV3OneBuild* b = build(p.get());
    IPluginV3OneRuntime* r = runtime(p.get());
    expect(co != nullptr && b != nullptr && r != nullptr, cat(name, " has core, build and runtime capabilities"));
    if (!co || !b || !r)
        return;
    expect(std::strcmp(co->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0
            && std::strcmp(b->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0
            && std::strcmp(r->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0,
        cat(name, " capability interfaces report their kinds"));
    expect(name == co->getPluginName() && std::string(co->getPluginVersion()) == "1"
            && std::string(co->getPluginNamespace()).empty(),
        cat(name, " core name/version/namespace = ", name, "/1/\"\""));
    expect(b->getNbOutputs() == 1, cat(name, " getNbOutputs = 1"));

    // Serialize fields, re-create (runtime phase, as when deserializing an engine), clone.
    Cfg back{};
    std::string why;
    bool ser = readFields(r->getFieldsToSerialize(), back, why) && sameCfg(back, c);
    expect(ser, cat(name, " getFieldsToSerialize returns all ", kNbFields, " fields with their values ", why));
    {
        // Copy the serialized fields (as TensorRT does) before the source plugin goes away.
        Fields again(back);
        PluginPtr p2 = create(name, again.fc(), TensorRTPhase::kRUNTIME);
        Cfg back2{};
        bool ok = p2 != nullptr && readFields(runtime(p2.get())->getFieldsToSerialize(), back2, why)
            && sameCfg(back2, c);
        expect(ok, cat(name, " re-created from its serialized fields (kRUNTIME) has the same fields ", why));
        PluginPtr p3(p->clone());
        Cfg back3{};
        ok = p3 != nullptr && readFields(runtime(p3.get())->getFieldsToSerialize(), back3, why) && sameCfg(back3, c);
        expect(ok, cat(name, " clone() keeps the fields ", why));
        HarnessResourceContext ctx;
        gLogger.clear();
        PluginPtr p4(r->attachToContext(&ctx));
        DriverState const& d = driverState();
        if (d.status != ADAFUSE_OK)
        {
            // An execution context would run the kernels: refused, naming both CUDA versions.
            expect(p4 == nullptr && gLogger.hasError({name, ": refused: ", d.line, "[in attachToContext]"}),
                cat(name, " attachToContext() refused: ", d.line, "; last error: ", gLogger.lastError()));
        }
        else if (name == "AdafuseSwitchLinear" && !haveGpu())
        {
            // Its per-context device state is allocated right there, so without a GPU it must
            // fail, and say why.
            expect(p4 == nullptr && gLogger.hasError({name, "failed: ", "[in attachToContext]"}),
                cat(name, " attachToContext() without a GPU fails with the CUDA error; last error: ",
                    gLogger.lastError()));
        }
        else
        {
            Cfg back4{};
            ok = p4 != nullptr && p4.get() != p.get()
                && readFields(runtime(p4.get())->getFieldsToSerialize(), back4, why) && sameCfg(back4, c);
            expect(ok, cat(name, " attachToContext() returns a new plugin with the same fields ", why,
                               ok ? "" : gLogger.lastError()));
        }
    }
    checkTypes(name, b, c);
    checkShapes(name, b, c);
    checkFormats(name, b, c);
    checkConfigureAndWorkspace(name, b, c);
}

// ============================================================================
// GPU checks
// ============================================================================
uint16_t floatToHalfBits(float f)
{
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t const sign = (x >> 16) & 0x8000u;
    uint32_t const absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u)
        return static_cast<uint16_t>(sign | (absx > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (absx >= 0x477ff000u) // rounds to >= 65520 -> inf
        return static_cast<uint16_t>(sign | 0x7c00u);
    if (absx < 0x38800000u) // subnormal half
    {
        float const af = std::fabs(f);
        int const m = static_cast<int>(std::nearbyint(af * 16777216.0f)); // 2^24
        return static_cast<uint16_t>(sign | static_cast<uint32_t>(m));
    }
    uint32_t const exp = ((absx >> 23) - 112) << 10;
    uint32_t mant = absx & 0x7fffffu;
    uint32_t h = exp | (mant >> 13);
    uint32_t const rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        ++h;
    return static_cast<uint16_t>(sign | h);
}

float halfBitsToFloat(uint16_t h)
{
    uint32_t const sign = (h & 0x8000u) << 16;
    uint32_t const exp = (h >> 10) & 0x1fu;
    uint32_t const mant = h & 0x3ffu;
    float f;
    if (exp == 0)
    {
        f = std::ldexp(static_cast<float>(mant), -24);
        return sign ? -f : f;
    }
    uint32_t bits;
    if (exp == 31)
        bits = sign | 0x7f800000u | (mant << 13);
    else
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    std::memcpy(&f, &bits, 4);
    return f;
}

uint16_t floatToBf16Bits(float f)
{
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return static_cast<uint16_t>((x >> 16) | 0x40u);
    uint32_t const lsb = (x >> 16) & 1u;
    x += 0x7fffu + lsb;
    return static_cast<uint16_t>(x >> 16);
}

float bf16BitsToFloat(uint16_t h)
{
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

//! Rounds `v` to dtype `t` in place and returns the raw bytes for the device.
std::vector<uint8_t> toDevice(std::vector<float>& v, DataType t)
{
    std::vector<uint8_t> bytes;
    if (t == DataType::kFLOAT)
    {
        bytes.resize(v.size() * 4);
        std::memcpy(bytes.data(), v.data(), bytes.size());
        return bytes;
    }
    bytes.resize(v.size() * 2);
    for (size_t i = 0; i < v.size(); ++i)
    {
        uint16_t h = t == DataType::kHALF ? floatToHalfBits(v[i]) : floatToBf16Bits(v[i]);
        v[i] = t == DataType::kHALF ? halfBitsToFloat(h) : bf16BitsToFloat(h);
        std::memcpy(bytes.data() + 2 * i, &h, 2);
    }
    return bytes;
}

std::vector<double> fromDevice(std::vector<uint8_t> const& bytes, DataType t)
{
    size_t const es = t == DataType::kFLOAT ? 4 : 2;
    std::vector<double> out(bytes.size() / es);
    for (size_t i = 0; i < out.size(); ++i)
    {
        if (t == DataType::kFLOAT)
        {
            float f;
            std::memcpy(&f, bytes.data() + 4 * i, 4);
            out[i] = f;
        }
        else
        {
            uint16_t h;
            std::memcpy(&h, bytes.data() + 2 * i, 2);
            out[i] = t == DataType::kHALF ? halfBitsToFloat(h) : bf16BitsToFloat(h);
        }
    }
    return out;
}

bool cudaOk(cudaError_t e, char const* what)
{
    if (e != cudaSuccess)
    {
        std::printf("  FAIL  CUDA %s: %s\n", what, cudaGetErrorString(e));
        ++gFailed;
        (void) cudaGetLastError(); // consumed, so that one failure does not fail the next check too
        return false;
    }
    return true;
}

struct DeviceBuffer
{
    void* ptr{nullptr};
    size_t bytes{0};
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t n)
        : bytes(n)
    {
        if (n > 0)
            cudaOk(cudaMalloc(&ptr, n), "cudaMalloc");
    }
    DeviceBuffer(std::vector<uint8_t> const& host)
        : DeviceBuffer(host.size())
    {
        if (ptr)
            cudaOk(cudaMemcpy(ptr, host.data(), host.size(), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
    }
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
    ~DeviceBuffer()
    {
        if (ptr)
            cudaFree(ptr);
    }
    std::vector<uint8_t> read() const
    {
        std::vector<uint8_t> h(bytes);
        if (ptr)
            cudaOk(cudaMemcpy(h.data(), ptr, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
        return h;
    }
};

//! The value of a float8 e4m3 (fn) byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits; 0x7F/0xFF are NaN.
double e4m3ToDouble(uint8_t b)
{
    int const exponent = (b >> 3) & 0xF, mantissa = b & 0x7;
    double const v = exponent == 0 ? std::ldexp(mantissa / 8.0, -6) : std::ldexp(1.0 + mantissa / 8.0, exponent - 7);
    return (b & 0x80) ? -v : v;
}

//! The e4m3 byte nearest to v (|v| <= 448), searched over the 126 finite magnitudes: test data only (the
//! reference takes the byte's own value, so how ties round does not matter here).
uint8_t nearestE4m3(double v)
{
    uint8_t best = 0;
    for (int m = 0; m < 0x7F; ++m)
        if (std::fabs(e4m3ToDouble(static_cast<uint8_t>(m)) - std::fabs(v)) < std::fabs(e4m3ToDouble(best) - std::fabs(v)))
            best = static_cast<uint8_t>(m);
    return static_cast<uint8_t>(v < 0 ? best | 0x80 : best);
}

//! Host copy of one problem (values already rounded to the dtype). FP8 W (c.fp8()): Wd holds the e4m3 bytes,
//! Wscale the per-output-row float32 scales, and W their product (the weight the float64 reference multiplies).
struct Problem
{
    Cfg c;
    DataType t;
    std::vector<float> W, A, B, bias;
    std::vector<uint8_t> Wd, Ad, Bd, biasd;
    std::vector<float> Wscale;
    std::vector<uint8_t> WscaleD;
};

Problem makeProblem(Cfg const& c, DataType t, std::mt19937& rng)
{
    std::uniform_real_distribution<float> u(-1.F, 1.F);
    Problem p{c, t, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
    auto fill = [&](std::vector<float>& v, size_t n, float s) {
        v.resize(n);
        for (auto& e : v)
            e = u(rng) * s;
    };
    fill(p.W, size_t(c.out) * c.in, 1.F / std::sqrt(float(c.in)));
    fill(p.A, size_t(c.experts) * c.rank * c.in, 1.F / std::sqrt(float(c.in)));
    fill(p.B, size_t(c.experts) * c.out * c.rank, 1.F / std::sqrt(float(c.rank)));
    fill(p.bias, c.hasBias ? size_t(c.out) : 0, 0.1F);
    if (c.fp8())
    {
        // quantize.py's scheme: scale = max|row| / 448, q = e4m3(w / scale); then W = q * scale exactly as read
        p.Wscale.resize(static_cast<size_t>(c.out));
        p.Wd.resize(p.W.size());
        for (int o = 0; o < c.out; ++o)
        {
            float* row = p.W.data() + size_t(o) * c.in;
            float absmax = 0.F;
            for (int i = 0; i < c.in; ++i)
                absmax = std::max(absmax, std::fabs(row[i]));
            float const sc = absmax > 0.F ? absmax / 448.F : 1.F;
            p.Wscale[static_cast<size_t>(o)] = sc;
            for (int i = 0; i < c.in; ++i)
            {
                uint8_t const q = nearestE4m3(double(row[i]) / sc);
                p.Wd[size_t(o) * c.in + i] = q;
                row[i] = static_cast<float>(e4m3ToDouble(q) * sc);
            }
        }
        p.WscaleD.resize(p.Wscale.size() * 4);
        std::memcpy(p.WscaleD.data(), p.Wscale.data(), p.WscaleD.size());
    }
    else
        p.Wd = toDevice(p.W, t);
    p.Ad = toDevice(p.A, t);
    p.Bd = toDevice(p.B, t);
    p.biasd = toDevice(p.bias, t);
    return p;
}

struct Route
{
    std::vector<int32_t> ids;  // [rows, k]
    std::vector<float> gates;  // [rows, k]
};

Route makeRoute(Cfg const& c, int rows, std::mt19937& rng)
{
    Route r;
    std::uniform_real_distribution<float> u(0.05F, 1.F);
    for (int n = 0; n < rows; ++n)
    {
        std::vector<int32_t> perm(static_cast<size_t>(c.experts));
        for (int e = 0; e < c.experts; ++e)
            perm[static_cast<size_t>(e)] = e;
        std::shuffle(perm.begin(), perm.end(), rng);
        float sum = 0.F;
        std::vector<float> g(static_cast<size_t>(c.topK));
        for (auto& x : g)
            sum += (x = u(rng));
        for (int j = 0; j < c.topK; ++j)
        {
            r.ids.push_back(perm[static_cast<size_t>(j)]);
            r.gates.push_back(g[static_cast<size_t>(j)] / sum);
        }
    }
    return r;
}

std::vector<double> reference(Problem const& p, std::vector<float> const& x, Route const& r, int rows)
{
    Cfg const& c = p.c;
    std::vector<double> y(size_t(rows) * c.out);
    std::vector<double> ax(static_cast<size_t>(c.rank));
    for (int n = 0; n < rows; ++n)
    {
        float const* xn = x.data() + size_t(n) * c.in;
        double* yn = y.data() + size_t(n) * c.out;
        for (int o = 0; o < c.out; ++o)
        {
            double acc = c.hasBias ? p.bias[static_cast<size_t>(o)] : 0.0;
            float const* w = p.W.data() + size_t(o) * c.in;
            for (int i = 0; i < c.in; ++i)
                acc += double(w[i]) * xn[i];
            yn[o] = acc;
        }
        for (int j = 0; j < c.topK; ++j)
        {
            int32_t e = r.ids[size_t(n) * c.topK + j];
            double g = r.gates[size_t(n) * c.topK + j];
            if (e < 0 || e >= c.experts)
                continue; // the release-build contract: an out-of-range expert contributes nothing
            for (int q = 0; q < c.rank; ++q)
            {
                double acc = 0;
                float const* a = p.A.data() + (size_t(e) * c.rank + q) * c.in;
                for (int i = 0; i < c.in; ++i)
                    acc += double(a[i]) * xn[i];
                ax[static_cast<size_t>(q)] = acc;
            }
            for (int o = 0; o < c.out; ++o)
            {
                double acc = 0;
                float const* bb = p.B.data() + (size_t(e) * c.out + o) * c.rank;
                for (int q = 0; q < c.rank; ++q)
                    acc += double(bb[q]) * ax[static_cast<size_t>(q)];
                yn[o] += double(c.scale) * g * acc;
            }
        }
    }
    return y;
}

double tolerance(DataType t)
{
    // max|y - ref| / max|ref|. float32 allows TF32 tensor-core accumulation; the
    // 16-bit types include output rounding and (switch) the rounding of W_merged.
    return t == DataType::kFLOAT ? 2e-3 : (t == DataType::kHALF ? 1e-2 : 4e-2);
}

// ============================================================================
// GPU: TensorRT's IPluginV3 lifecycle, replayed
// ============================================================================
// The order and the arguments follow the TensorRT Developer Guide, "Extending TensorRT with
// Custom Layers" -> "Plugin API Description" -> "IPluginV3 API Description"
// (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/plugins-api-migration.html),
// and the API reference of IPluginV3OneBuild / IPluginV3OneRuntime; each step names its source.
// Every step runs the real kernels; every CUDA call's status is checked (cudaOk); outputs are
// NaN-poisoned before each enqueue and compared with a float64 reference afterwards.

struct HostRun
{
    std::vector<float> x; // dtype-rounded
    Route route;
    int rows{0};
};

//! One plugin layer of the replayed network: its weights on the device and its I/O buffers.
struct Layer
{
    Problem p;
    std::unique_ptr<DeviceBuffer> W, A, B, bias, Wscale;
};

Layer makeLayer(Cfg const& c, DataType t, std::mt19937& rng)
{
    Layer l{makeProblem(c, t, rng), nullptr, nullptr, nullptr, nullptr, nullptr};
    l.Wscale = std::make_unique<DeviceBuffer>(l.p.WscaleD);
    l.W = std::make_unique<DeviceBuffer>(l.p.Wd);
    l.A = std::make_unique<DeviceBuffer>(l.p.Ad);
    l.B = std::make_unique<DeviceBuffer>(l.p.Bd);
    l.bias = std::make_unique<DeviceBuffer>(l.p.biasd);
    return l;
}

//! Activation buffers of one execution context for one layer, sized for `maxRows`.
struct Activations
{
    Activations(Cfg const& c, DataType t, int maxRows)
        : es(t == DataType::kFLOAT ? 4 : 2)
        , x(size_t(maxRows) * c.in * es)
        , ids(size_t(maxRows) * c.topK * 4)
        , gates(size_t(maxRows) * c.topK * 4)
        , y(size_t(maxRows) * c.out * es)
    {
    }
    size_t es;
    DeviceBuffer x, ids, gates, y;
};

std::vector<PluginTensorDesc> runtimeDescs(Cfg const& c, DataType t, std::vector<int64_t> const& lead, PluginTensorDesc& out)
{
    Shapes s = shapesFor(c, lead);
    std::vector<DataType> types = typesFor(c, t);
    std::vector<PluginTensorDesc> in;
    for (size_t i = 0; i < types.size(); ++i)
        in.push_back(desc(s.in[i], types[i]));
    out = desc(s.out, t);
    return in;
}

int64_t product(std::vector<int64_t> const& lead)
{
    int64_t n = 1;
    for (int64_t d : lead)
        n *= d;
    return n;
}

//! Random x and a route for `rows` rows, uploaded on `stream` (host copies kept in `run`),
//! and y poisoned with NaN (0xFF bytes are NaN in float32, float16 and bfloat16).
bool stage(Layer const& l, Activations& a, HostRun& run, int rows, Route const& route, std::mt19937& rng,
    cudaStream_t stream, std::vector<std::vector<uint8_t>>& keepAlive)
{
    Cfg const& c = l.p.c;
    std::uniform_real_distribution<float> u(-1.F, 1.F);
    run.rows = rows;
    run.route = route;
    run.x.assign(size_t(rows) * c.in, 0.F);
    for (auto& e : run.x)
        e = u(rng);
    keepAlive.push_back(toDevice(run.x, l.p.t));
    std::vector<uint8_t> const& xd = keepAlive.back();
    bool ok = cudaOk(cudaMemcpyAsync(a.x.ptr, xd.data(), xd.size(), cudaMemcpyHostToDevice, stream), "upload x");
    ok = ok
        && cudaOk(cudaMemcpyAsync(a.ids.ptr, route.ids.data(), route.ids.size() * 4, cudaMemcpyHostToDevice, stream),
            "upload expert_ids");
    ok = ok
        && cudaOk(cudaMemcpyAsync(a.gates.ptr, route.gates.data(), route.gates.size() * 4, cudaMemcpyHostToDevice,
                      stream),
            "upload gates");
    return ok && cudaOk(cudaMemsetAsync(a.y.ptr, 0xFF, size_t(rows) * c.out * a.es, stream), "NaN-poison y");
}

//! max|y - ref| / max|ref| over the first run.rows rows of y (infinity if any y is not finite).
double relError(Layer const& l, Activations const& a, HostRun const& run)
{
    std::vector<uint8_t> bytes = a.y.read();
    bytes.resize(size_t(run.rows) * l.p.c.out * a.es);
    std::vector<double> y = fromDevice(bytes, l.p.t);
    std::vector<double> ref = reference(l.p, run.x, run.route, run.rows);
    double maxRef = 1e-12, maxErr = 0;
    for (size_t i = 0; i < y.size(); ++i)
    {
        maxRef = std::max(maxRef, std::fabs(ref[i]));
        maxErr = std::isfinite(y[i]) ? std::max(maxErr, std::fabs(y[i] - ref[i]))
                                     : std::numeric_limits<double>::infinity();
    }
    return maxErr / maxRef;
}

int32_t enqueueLayer(IPluginV3* plugin, Layer const& l, Activations& a, std::vector<PluginTensorDesc> const& in,
    PluginTensorDesc const& out, DeviceBuffer& workspace, cudaStream_t stream)
{
    std::vector<void const*> inPtrs = {a.x.ptr, l.W->ptr, l.A->ptr, l.B->ptr, a.ids.ptr, a.gates.ptr};
    if (l.p.c.hasBias)
        inPtrs.push_back(l.bias->ptr);
    if (l.p.c.fp8())
        inPtrs.push_back(l.Wscale->ptr);
    void* outPtrs[1] = {a.y.ptr};
    return runtime(plugin)->enqueue(in.data(), &out, inPtrs.data(), outPtrs, workspace.ptr, stream);
}

//! Worst relative error per "plugin dtype" and the error recorder of one replay.
struct Scoreboard
{
    std::map<std::string, double> worst;
    void record(std::string const& key, std::string const& label, double err, DataType t)
    {
        worst[key] = std::max(worst.count(key) ? worst[key] : 0.0, err);
        expect(err <= tolerance(t), cat(label, " max rel err ", err, " (tol ", tolerance(t), ")"));
    }
};

//! A copy of a field collection as an engine file holds it (names and bytes), read back
//! by the runtime phase.
struct SerializedFields
{
    std::vector<std::string> names;
    std::vector<std::vector<uint8_t>> data;
    std::vector<PluginFieldType> types;
    std::vector<int32_t> lengths;
    std::vector<PluginField> fields;
    PluginFieldCollection fc{};

    static size_t elementSize(PluginFieldType t)
    {
        switch (t)
        {
        case PluginFieldType::kINT64:
        case PluginFieldType::kFLOAT64: return 8;
        case PluginFieldType::kINT16:
        case PluginFieldType::kFLOAT16:
        case PluginFieldType::kBF16: return 2;
        case PluginFieldType::kINT8:
        case PluginFieldType::kCHAR: return 1;
        default: return 4;
        }
    }
    bool copy(PluginFieldCollection const* src)
    {
        if (src == nullptr)
            return false;
        for (int32_t i = 0; i < src->nbFields; ++i)
        {
            PluginField const& f = src->fields[i];
            if (f.name == nullptr || f.data == nullptr || f.length < 0)
                return false;
            names.emplace_back(f.name);
            auto const* b = static_cast<uint8_t const*>(f.data);
            data.emplace_back(b, b + elementSize(f.type) * static_cast<size_t>(f.length));
            types.push_back(f.type);
            lengths.push_back(f.length);
        }
        for (size_t i = 0; i < names.size(); ++i)
            fields.emplace_back(names[i].c_str(), data[i].data(), types[i], lengths[i]);
        fc.nbFields = static_cast<int32_t>(fields.size());
        fc.fields = fields.data();
        return true;
    }
};

constexpr int kLayers = 2;

struct ReplayCase
{
    Cfg c;
    std::vector<int64_t> bigPrefill; // leading dims of the long-prefill step (> 2048 rows: chunked)
};

//! The whole lifecycle for one plugin, dtype and configuration.
void replayLifecycle(std::string const& name, ReplayCase const& rc, DataType t, std::mt19937& rng, Scoreboard& board)
{
    Cfg const& c = rc.c;
    std::string const key = cat(name, c.fp8() ? "(fp8 W)" : "", " ", typeName(t));
    std::string const tag = cat(key, " [", c.str(), "]");
    std::printf("[lifecycle %s]\n", tag.c_str());
    int64_t const bigRows = product(rc.bigPrefill);
    int const maxRows = static_cast<int>(std::max<int64_t>(bigRows, 8));
    std::vector<Layer> layers;
    for (int i = 0; i < kLayers; ++i)
        layers.push_back(makeLayer(c, t, rng));

    // ---- Build phase --------------------------------------------------------------------
    // createPlugin(kBUILD): what the ONNX parser does with the node's attributes.
    Fields f(c);
    gLogger.clear();
    PluginPtr proto = create(name, f.fc(), TensorRTPhase::kBUILD);
    expect(proto != nullptr, cat(tag, " build: createPlugin(kBUILD) ", proto ? "" : gLogger.lastError()));
    if (!proto)
        return;
    // IPluginV3::clone: the builder keeps its own copy of the plugin for every layer that
    // uses it ("IPluginV3 API Description": clone may be called at any time of the build).
    std::vector<PluginPtr> built;
    for (int i = 0; i < kLayers; ++i)
    {
        built.emplace_back(proto->clone());
        expect(built.back() != nullptr && built.back().get() != proto.get(), cat(tag, " build: clone for layer ", i));
        if (!built.back())
            return;
    }
    // getNbOutputs, getOutputDataTypes, getOutputShapes: how the builder connects the layer.
    for (int i = 0; i < kLayers; ++i)
    {
        IPluginV3OneBuild* b = build(built[static_cast<size_t>(i)].get());
        std::vector<DataType> ti = typesFor(c, t);
        DataType to[1] = {DataType::kINT8};
        expect(b->getNbOutputs() == 1 && b->getOutputDataTypes(to, 1, ti.data(), c.nbInputs()) == 0 && to[0] == t,
            cat(tag, " build: layer ", i, " getNbOutputs = 1, getOutputDataTypes = ", typeName(t)));
    }
    // supportsFormatCombination, position by position (IPluginV3OneBuild::supportsFormatCombination:
    // inOut[0..pos-1] are already decided, later positions are not meaningful yet). The harness
    // offers every candidate at `pos` with garbage at later positions, as the builder's search
    // may, and keeps the candidate the network wants; the plugin must accept exactly that one
    // (x: any of the float types).
    {
        std::vector<DataType> want = typesFor(c, t);
        want.push_back(t);
        Shapes s = shapesFor(c, {-1, -1});
        std::vector<DynamicPluginTensorDesc> io;
        for (int32_t i = 0; i < c.nbInputs(); ++i)
            io.push_back(dynDesc(s.in[static_cast<size_t>(i)], s.in[static_cast<size_t>(i)], s.in[static_cast<size_t>(i)],
                DataType::kINT8));
        io.push_back(dynDesc(s.out, s.out, s.out, DataType::kINT8));
        std::string bad;
        IPluginV3OneBuild* b = build(built[0].get());
        for (int32_t pos = 0; pos <= c.nbInputs(); ++pos)
        {
            for (int32_t later = pos + 1; later <= c.nbInputs(); ++later)
            {
                io[static_cast<size_t>(later)].desc.type = DataType::kINT8; // undecided
                io[static_cast<size_t>(later)].desc.format = TensorFormat::kCHW32;
            }
            std::vector<DataType> const xs = xTypes(c);
            for (DataType cand :
                {DataType::kFLOAT, DataType::kHALF, DataType::kBF16, DataType::kINT32, DataType::kINT8, DataType::kFP8})
            {
                for (TensorFormat fmt : {TensorFormat::kCHW32, TensorFormat::kLINEAR})
                {
                    io[static_cast<size_t>(pos)].desc.type = cand;
                    io[static_cast<size_t>(pos)].desc.format = fmt;
                    bool const got = b->supportsFormatCombination(pos, io.data(), c.nbInputs(), 1);
                    bool const wanted = fmt == TensorFormat::kLINEAR
                        && (pos == 0 ? std::find(xs.begin(), xs.end(), cand) != xs.end()
                                     : cand == want[static_cast<size_t>(pos)]);
                    if (got != wanted && bad.empty())
                        bad = cat("pos ", pos, " ", typeName(cand), fmt == TensorFormat::kLINEAR ? " linear" : " chw32",
                            " answered ", got);
                }
            }
            io[static_cast<size_t>(pos)].desc.type = want[static_cast<size_t>(pos)];
            io[static_cast<size_t>(pos)].desc.format = TensorFormat::kLINEAR;
        }
        expect(bad.empty(), cat(tag, " build: supportsFormatCombination position by position ", bad));
    }
    // configurePlugin once per optimization profile, with desc.dims -1 where dynamic and min/max
    // as bounds (IPluginV3OneBuild::configurePlugin; DynamicPluginTensorDesc). Profile 0 is
    // decode (batch up to 4, one token), profile 1 prefill up to the long-prefill shape. The
    // expert_ids / gates bounds are looser than x's, as a Reshape in front of them gives.
    struct Profile
    {
        std::vector<int64_t> mn, opt, mx;
    };
    std::vector<Profile> profiles = {{{1, 1}, {1, 1}, {4, 1}}, {{1, 1}, rc.bigPrefill, rc.bigPrefill}};
    size_t workspaceBytes = 0;
    std::vector<DataType> types = typesFor(c, t);
    for (size_t pi = 0; pi < profiles.size(); ++pi)
    {
        Profile const& pr = profiles[pi];
        Shapes dyn = shapesFor(c, {-1, -1}), mn = shapesFor(c, pr.mn), mx = shapesFor(c, pr.mx),
               loose = shapesFor(c, {pr.mx[0] * 2, pr.mx[1] * 2});
        std::vector<DynamicPluginTensorDesc> in;
        for (size_t i = 0; i < types.size(); ++i)
        {
            bool const route = i == size_t(kINPUT_EXPERT_IDS_POS) || i == size_t(kINPUT_GATES_POS);
            in.push_back(dynDesc(dyn.in[i], mn.in[i], route ? loose.in[i] : mx.in[i], types[i]));
        }
        DynamicPluginTensorDesc out = dynDesc(dyn.out, mn.out, mx.out, t);
        for (int i = 0; i < kLayers; ++i)
        {
            IPluginV3OneBuild* b = build(built[static_cast<size_t>(i)].get());
            gLogger.clear();
            int32_t const r = b->configurePlugin(in.data(), c.nbInputs(), &out, 1);
            expect(r == 0, cat(tag, " build: layer ", i, " configurePlugin(profile ", pi, ", bounds) ",
                               r == 0 ? "" : gLogger.lastError()));
            // getWorkspaceSize per profile; the engine's workspace covers the largest.
            workspaceBytes = std::max(workspaceBytes, b->getWorkspaceSize(in.data(), c.nbInputs(), &out, 1));
        }
    }
    size_t const chunkWs = adafuse_lora_linear_workspace_size(
        static_cast<int>(std::min<int64_t>(bigRows, 2048)), c.in, c.out, c.experts, c.rank, c.topK);
    expect(workspaceBytes == chunkWs,
        cat(tag, " build: workspace = one chunk of min(", bigRows, ", 2048) rows = ", chunkWs, " (got ", workspaceBytes, ")"));
    DeviceBuffer workspace(workspaceBytes);

    // Timing: onShapeChange with the profile's opt shape, then enqueues on uninitialised
    // activations (IPluginV3OneRuntime::onShapeChange "both during creation of an engine by
    // IBuilder and execution of an engine by IExecutionContext"). The builder has the weights;
    // x / expert_ids / gates hold whatever the memory held: random bytes here, so NaN/Inf
    // activations and expert ids far out of range. Nothing may fault or write the weights.
    {
        cudaStream_t ts = nullptr;
        if (!cudaOk(cudaStreamCreateWithFlags(&ts, cudaStreamNonBlocking), "timing stream"))
            return;
        for (Profile const& pr : profiles)
        {
            int64_t const rows = product(pr.opt);
            Activations a(c, t, static_cast<int>(rows));
            std::vector<uint8_t> junk(std::max({a.x.bytes, a.ids.bytes, a.gates.bytes}));
            for (auto& byte : junk)
                byte = static_cast<uint8_t>(rng());
            for (DeviceBuffer* d : {&a.x, &a.ids, &a.gates})
                cudaOk(cudaMemcpy(d->ptr, junk.data(), d->bytes, cudaMemcpyHostToDevice), "garbage activations");
            PluginTensorDesc out{};
            std::vector<PluginTensorDesc> in = runtimeDescs(c, t, pr.opt, out);
            for (int i = 0; i < kLayers; ++i)
            {
                IPluginV3* pl = built[static_cast<size_t>(i)].get();
                gLogger.clear();
                int32_t r = runtime(pl)->onShapeChange(in.data(), c.nbInputs(), &out, 1);
                for (int rep = 0; rep < 3 && r == 0; ++rep)
                    r = enqueueLayer(pl, layers[static_cast<size_t>(i)], a, in, out, workspace, ts);
                bool const synced = cudaOk(cudaStreamSynchronize(ts), "timing enqueues");
                expect(r == 0 && synced, cat(tag, " build: layer ", i, " timing enqueues on garbage, rows ", rows, " ",
                                             r == 0 ? "" : gLogger.lastError()));
            }
        }
        cudaOk(cudaStreamDestroy(ts), "cudaStreamDestroy");
    }

    // Serialisation: the engine stores getFieldsToSerialize of every layer; the build-time
    // objects are then destroyed.
    std::vector<std::unique_ptr<SerializedFields>> engine;
    for (int i = 0; i < kLayers; ++i)
    {
        engine.push_back(std::make_unique<SerializedFields>());
        bool const ok = engine.back()->copy(runtime(built[static_cast<size_t>(i)].get())->getFieldsToSerialize());
        expect(ok, cat(tag, " build: getFieldsToSerialize of layer ", i, " copied"));
        if (!ok)
            return;
    }
    built.clear();
    proto.reset();

    // ---- Runtime phase --------------------------------------------------------------------
    // Deserialisation: createPlugin(kRUNTIME) from the stored fields, one object per layer
    // (owned by the engine).
    std::vector<PluginPtr> engineLayers;
    for (int i = 0; i < kLayers; ++i)
    {
        gLogger.clear();
        engineLayers.emplace_back(create(name, &engine[static_cast<size_t>(i)]->fc, TensorRTPhase::kRUNTIME));
        Cfg back{};
        std::string why;
        bool const ok = engineLayers.back() != nullptr
            && readFields(runtime(engineLayers.back().get())->getFieldsToSerialize(), back, why) && sameCfg(back, c);
        expect(ok, cat(tag, " runtime: createPlugin(kRUNTIME) of layer ", i, " from the engine's fields ", why,
                           ok ? "" : gLogger.lastError()));
        if (!ok)
            return;
    }
    // attachToContext per execution context (IPluginV3OneRuntime::attachToContext: "clone the
    // plugin, attach the cloned plugin object to a execution context"): two contexts here.
    HarnessResourceContext resources;
    auto attach = [&](std::vector<PluginPtr>& ctx, char const* ctxName) {
        for (int i = 0; i < kLayers; ++i)
        {
            gLogger.clear();
            ctx.emplace_back(runtime(engineLayers[static_cast<size_t>(i)].get())->attachToContext(&resources));
            expect(ctx.back() != nullptr, cat(tag, " runtime: attachToContext(", ctxName, ") layer ", i, " ",
                                              ctx.back() ? "" : gLogger.lastError()));
        }
        return ctx.size() == size_t(kLayers) && ctx[0] && ctx[1];
    };
    std::vector<PluginPtr> ctxA, ctxB;
    if (!attach(ctxA, "context A") || !attach(ctxB, "context B"))
        return;

    // Two contexts of one engine, concurrently on two streams: each step is enqueued on both
    // before either is synchronised. onShapeChange is called when the shape differs from the
    // previous step's, as enqueueV3 does lazily.
    cudaStream_t sA = nullptr, sB = nullptr;
    if (!cudaOk(cudaStreamCreateWithFlags(&sA, cudaStreamNonBlocking), "stream A")
        || !cudaOk(cudaStreamCreateWithFlags(&sB, cudaStreamNonBlocking), "stream B"))
        return;
    struct Ctx
    {
        std::vector<PluginPtr>* plugins;
        cudaStream_t stream;
        std::vector<std::unique_ptr<Activations>> act;
        std::vector<int64_t> lastLead;
        char const* name;
        std::unique_ptr<DeviceBuffer> workspace; // each execution context has its own
    };
    std::vector<Ctx> ctxs(2);
    ctxs[0].plugins = &ctxA;
    ctxs[0].stream = sA;
    ctxs[0].name = "A";
    ctxs[1].plugins = &ctxB;
    ctxs[1].stream = sB;
    ctxs[1].name = "B";
    for (Ctx& cx : ctxs)
    {
        cx.workspace = std::make_unique<DeviceBuffer>(workspaceBytes);
        for (int i = 0; i < kLayers; ++i)
            cx.act.push_back(std::make_unique<Activations>(c, t, maxRows));
    }
    Route r1 = makeRoute(c, 1, rng), r2 = makeRoute(c, 1, rng);
    Route r1g = r1; // same experts, other gates
    if (c.topK > 1)
        std::swap(r1g.gates[0], r1g.gates[1]);
    else
        r1g.gates[0] *= 0.5F;
    std::vector<std::vector<int64_t>> steps = {{1, 1}, {1, 1}, {1, 1}, {1, 5}, {1, 1}, {1, 1}, {4, 1}, rc.bigPrefill,
        {1, 1}};
    std::vector<Route const*> decodeRoutes = {&r1, &r1, &r2, nullptr, &r2, &r1g, nullptr, nullptr, &r1};
    for (size_t st = 0; st < steps.size(); ++st)
    {
        std::vector<int64_t> const& lead = steps[st];
        int const rows = static_cast<int>(product(lead));
        std::vector<std::vector<uint8_t>> keep;
        std::vector<std::vector<HostRun>> runs(2, std::vector<HostRun>(kLayers));
        bool ok = true;
        for (size_t k = 0; k < ctxs.size(); ++k)
        {
            Ctx& cx = ctxs[k];
            PluginTensorDesc out{};
            std::vector<PluginTensorDesc> in = runtimeDescs(c, t, lead, out);
            bool const shapeChanged = cx.lastLead != lead;
            for (int i = 0; i < kLayers && ok; ++i)
            {
                // Context B runs its own routes (same shapes): the contexts must not share state.
                Route route = decodeRoutes[st] != nullptr && k == 0 ? *decodeRoutes[st] : makeRoute(c, rows, rng);
                ok = stage(layers[static_cast<size_t>(i)], *cx.act[static_cast<size_t>(i)],
                    runs[k][static_cast<size_t>(i)], rows, route, rng, cx.stream, keep);
                IPluginV3* pl = (*cx.plugins)[static_cast<size_t>(i)].get();
                gLogger.clear();
                int32_t r = shapeChanged ? runtime(pl)->onShapeChange(in.data(), c.nbInputs(), &out, 1) : 0;
                if (r == 0)
                    r = enqueueLayer(pl, layers[static_cast<size_t>(i)], *cx.act[static_cast<size_t>(i)], in, out,
                        *cx.workspace, cx.stream);
                expect(r == 0, cat(tag, " runtime: context ", cx.name, " step ", st, " layer ", i, " rows ", rows,
                                   " enqueue ", r == 0 ? "" : gLogger.lastError()));
                ok = ok && r == 0;
            }
            cx.lastLead = lead;
        }
        ok = cudaOk(cudaStreamSynchronize(sA), "sync stream A") && cudaOk(cudaStreamSynchronize(sB), "sync stream B")
            && ok;
        if (!ok)
            break;
        for (size_t k = 0; k < ctxs.size(); ++k)
            for (int i = 0; i < kLayers; ++i)
                board.record(key,
                    cat(tag, " runtime: context ", ctxs[k].name, " step ", st, " layer ", i, " rows ", rows),
                    relError(layers[static_cast<size_t>(i)], *ctxs[k].act[static_cast<size_t>(i)],
                        runs[k][static_cast<size_t>(i)]),
                    t);
    }
    cudaOk(cudaStreamDestroy(sA), "cudaStreamDestroy");
    cudaOk(cudaStreamDestroy(sB), "cudaStreamDestroy");

    // A third context whose first enqueues happen under stream capture, with the lazy
    // onShapeChange inside the capture, as enqueueV3 does when the shape changed. Global
    // capture mode: any unsafe CUDA call (cudaMalloc, a synchronisation) would invalidate it.
    std::vector<PluginPtr> ctxC;
    if (!attach(ctxC, "context C"))
        return;
    cudaStream_t sC = nullptr;
    if (!cudaOk(cudaStreamCreateWithFlags(&sC, cudaStreamNonBlocking), "stream C"))
        return;
    std::vector<std::unique_ptr<Activations>> actC;
    DeviceBuffer workspaceC(workspaceBytes);
    for (int i = 0; i < kLayers; ++i)
        actC.push_back(std::make_unique<Activations>(c, t, maxRows));
    // Captures both layers at `lead`; returns the enqueue status and the instantiated graph.
    auto capture = [&](std::vector<int64_t> const& lead, bool changed, cudaGraphExec_t& exec) -> int32_t {
        PluginTensorDesc out{};
        std::vector<PluginTensorDesc> in = runtimeDescs(c, t, lead, out);
        exec = nullptr;
        cudaGraph_t graph = nullptr;
        if (!cudaOk(cudaStreamBeginCapture(sC, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture"))
            return -2;
        int32_t r = 0;
        gLogger.clear();
        for (int i = 0; i < kLayers && r == 0; ++i)
        {
            IPluginV3* pl = ctxC[static_cast<size_t>(i)].get();
            r = changed ? runtime(pl)->onShapeChange(in.data(), c.nbInputs(), &out, 1) : 0;
            if (r == 0)
                r = enqueueLayer(pl, layers[static_cast<size_t>(i)], *actC[static_cast<size_t>(i)], in, out, workspaceC, sC);
        }
        // The capture must end cleanly whether or not the enqueue refused: a refusal makes no
        // CUDA call, so it cannot have invalidated the capture.
        bool const ended = cudaOk(cudaStreamEndCapture(sC, &graph), "cudaStreamEndCapture");
        if (ended && r == 0)
            cudaOk(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
        if (graph != nullptr)
            cudaOk(cudaGraphDestroy(graph), "cudaGraphDestroy");
        return ended ? r : -2;
    };
    // Replays `exec` with fresh x / routes written into the captured buffers, checking numerics.
    auto replay = [&](cudaGraphExec_t exec, int rows, std::vector<Route> const& routes, std::string const& what) {
        for (size_t q = 0; q < routes.size(); ++q)
        {
            std::vector<std::vector<uint8_t>> keep;
            std::vector<HostRun> runs(kLayers);
            bool ok = true;
            for (int i = 0; i < kLayers && ok; ++i)
                ok = stage(layers[static_cast<size_t>(i)], *actC[static_cast<size_t>(i)], runs[static_cast<size_t>(i)],
                    rows, routes[q], rng, sC, keep);
            ok = ok && cudaOk(cudaGraphLaunch(exec, sC), "cudaGraphLaunch") && cudaOk(cudaStreamSynchronize(sC), "replay sync");
            expect(ok, cat(tag, " ", what, " replay ", q, " ran"));
            if (!ok)
                return;
            for (int i = 0; i < kLayers; ++i)
                board.record(key, cat(tag, " ", what, " replay ", q, " layer ", i),
                    relError(layers[static_cast<size_t>(i)], *actC[static_cast<size_t>(i)], runs[static_cast<size_t>(i)]),
                    t);
        }
    };
    // Captures at `lead` (with onShapeChange when `changed`), then replays over `routes`.
    auto captureAndReplay = [&](std::vector<int64_t> const& lead, bool changed, std::vector<Route> const& routes,
                                std::string const& what) {
        cudaGraphExec_t exec = nullptr;
        int32_t const r = capture(lead, changed, exec);
        expect(r == 0 && exec != nullptr, cat(tag, " ", what, " captured ", r == 0 ? "" : gLogger.lastError()));
        if (exec != nullptr)
        {
            replay(exec, static_cast<int>(product(lead)), routes, what);
            cudaOk(cudaGraphExecDestroy(exec), "cudaGraphExecDestroy");
        }
    };
    // (a) first enqueue of the context: a 5-row prefill, captured.
    captureAndReplay({1, 5}, true, {makeRoute(c, 5, rng), makeRoute(c, 5, rng)},
        "capture: first enqueue (5 rows, lazy onShapeChange)");
    Route d0 = makeRoute(c, 1, rng), d1 = makeRoute(c, 1, rng);
    {
        // (b) the first one-row enqueue, captured with its lazy onShapeChange. AdafuseLoraLinear
        // needs nothing more; AdafuseSwitchLinear's merged weight cannot be allocated inside a
        // capture, so it must refuse with a message that says what to do, and leave the capture
        // valid.
        if (name == "AdafuseSwitchLinear")
        {
            cudaGraphExec_t exec = nullptr;
            int32_t const r = capture({1, 1}, true, exec);
            expect(r == -1 && exec == nullptr
                    && gLogger.hasError({name, "captured into a CUDA graph", "merged weight", "outside capture"}),
                cat(tag, " capture: first one-row enqueue refused clearly, capture still valid (rc ", r, ") ",
                    gLogger.lastError()));
        }
        else
        {
            captureAndReplay({1, 1}, true, {d0, d0, d1}, "capture: first one-row enqueue (lazy onShapeChange)");
        }
    }
    {
        // (c) one enqueue outside capture at this shape (what TensorRT asks after a shape change
        // before capturing), then (d) the capture of the decode step, replayed over route changes.
        PluginTensorDesc out{};
        std::vector<PluginTensorDesc> in = runtimeDescs(c, t, {1, 1}, out);
        std::vector<std::vector<uint8_t>> keep;
        std::vector<HostRun> runs(kLayers);
        bool ok = true;
        for (int i = 0; i < kLayers && ok; ++i)
        {
            ok = stage(layers[static_cast<size_t>(i)], *actC[static_cast<size_t>(i)], runs[static_cast<size_t>(i)], 1, d1,
                rng, sC, keep);
            // onShapeChange again: the refused enqueueV3 above may not have reached every layer.
            gLogger.clear();
            IPluginV3* pl = ctxC[static_cast<size_t>(i)].get();
            int32_t r = runtime(pl)->onShapeChange(in.data(), c.nbInputs(), &out, 1);
            if (r == 0)
                r = enqueueLayer(pl, layers[static_cast<size_t>(i)], *actC[static_cast<size_t>(i)], in, out, workspaceC, sC);
            expect(r == 0, cat(tag, " capture: one-row enqueue outside capture, layer ", i, " ",
                               r == 0 ? "" : gLogger.lastError()));
            ok = ok && r == 0;
        }
        if (ok && cudaOk(cudaStreamSynchronize(sC), "sync C"))
            for (int i = 0; i < kLayers; ++i)
                board.record(key, cat(tag, " capture: uncaptured one-row step layer ", i),
                    relError(layers[static_cast<size_t>(i)], *actC[static_cast<size_t>(i)], runs[static_cast<size_t>(i)]),
                    t);
        captureAndReplay({1, 1}, false, {d0, d0, d1, r1, d0}, "capture: one-row decode step");
    }
    cudaOk(cudaStreamDestroy(sC), "cudaStreamDestroy");

    // The weights are inputs: read-only for every plugin object above.
    for (int i = 0; i < kLayers; ++i)
        expect(layers[static_cast<size_t>(i)].W->read() == layers[static_cast<size_t>(i)].p.Wd
                && layers[static_cast<size_t>(i)].A->read() == layers[static_cast<size_t>(i)].p.Ad
                && layers[static_cast<size_t>(i)].B->read() == layers[static_cast<size_t>(i)].p.Bd,
            cat(tag, " layer ", i, " W, A, B unchanged after the whole lifecycle"));
}

//! Out-of-range expert ids: in a release build they contribute nothing (the reference drops
//! them too); with ADAFUSE_CHECK_EXPERT_IDS=1 (--check-expert-ids) an attached plugin's
//! enqueue fails naming the row, the slot and the value, also when the bad id went through a
//! captured graph.
void expertIdContract(std::string const& name, bool debugChecks, std::mt19937& rng)
{
    Cfg const c{256, 192, 4, 8, 2, 2.0F, 1};
    DataType const t = DataType::kHALF;
    std::string const tag = cat(name, " out-of-range expert id (", debugChecks ? "debug check on" : "release", ")");
    std::printf("[%s]\n", tag.c_str());
    Layer l = makeLayer(c, t, rng);
    Fields f(c);
    PluginPtr engineLayer = create(name, f.fc(), TensorRTPhase::kRUNTIME);
    HarnessResourceContext resources;
    PluginPtr pl(engineLayer ? runtime(engineLayer.get())->attachToContext(&resources) : nullptr);
    expect(pl != nullptr, cat(tag, ": attached ", pl ? "" : gLogger.lastError()));
    if (!pl)
        return;
    cudaStream_t s = nullptr;
    if (!cudaOk(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream"))
        return;
    Activations a(c, t, 4);
    DeviceBuffer workspace(adafuse_lora_linear_workspace_size(4, c.in, c.out, c.experts, c.rank, c.topK));
    for (int rows : {4, 1})
    {
        Route bad = makeRoute(c, rows, rng);
        int const flat = (rows - 1) * c.topK + 1; // last row, slot 1
        bad.ids[static_cast<size_t>(flat)] = c.experts + 3;
        std::vector<std::vector<uint8_t>> keep;
        HostRun run;
        PluginTensorDesc out{};
        std::vector<PluginTensorDesc> in = runtimeDescs(c, t, {rows}, out);
        bool ok = stage(l, a, run, rows, bad, rng, s, keep);
        gLogger.clear();
        int32_t r = runtime(pl.get())->onShapeChange(in.data(), c.nbInputs(), &out, 1);
        if (r == 0)
            r = enqueueLayer(pl.get(), l, a, in, out, workspace, s);
        ok = cudaOk(cudaStreamSynchronize(s), "sync") && ok;
        if (debugChecks)
        {
            expect(ok && r != 0
                    && gLogger.hasError({name, "expert_ids", cat("holds ", c.experts + 3),
                        cat("row ", rows - 1, ", slot 1"), "num_experts=4"}),
                cat(tag, " rows ", rows, ": enqueue refused naming row, slot and value; last error: ", gLogger.lastError()));
        }
        else
        {
            expect(ok && r == 0, cat(tag, " rows ", rows, ": enqueue ran ", r == 0 ? "" : gLogger.lastError()));
            if (ok && r == 0)
            {
                double const err = relError(l, a, run);
                expect(err <= tolerance(t), cat(tag, " rows ", rows, ": the bad slot contributed nothing (max rel err ",
                                                err, " against the reference without it)"));
            }
        }
    }
    if (debugChecks)
    {
        // Under capture the check only records; the next enqueue outside capture reports it.
        PluginTensorDesc out{};
        std::vector<PluginTensorDesc> in = runtimeDescs(c, t, {4}, out);
        Route good = makeRoute(c, 4, rng);
        std::vector<std::vector<uint8_t>> keep;
        HostRun run;
        bool ok = stage(l, a, run, 4, good, rng, s, keep) && cudaOk(cudaStreamSynchronize(s), "sync");
        int32_t r = runtime(pl.get())->onShapeChange(in.data(), c.nbInputs(), &out, 1);
        r = r == 0 ? enqueueLayer(pl.get(), l, a, in, out, workspace, s) : r; // shape settles outside capture
        ok = ok && r == 0 && cudaOk(cudaStreamSynchronize(s), "sync");
        cudaGraph_t graph = nullptr;
        cudaGraphExec_t exec = nullptr;
        ok = ok && cudaOk(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), "begin capture");
        int32_t const rc = ok ? enqueueLayer(pl.get(), l, a, in, out, workspace, s) : -1;
        ok = ok && cudaOk(cudaStreamEndCapture(s, &graph), "end capture") && rc == 0
            && cudaOk(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
        Route bad = good;
        bad.ids[5] = -7; // row 2, slot 1
        ok = ok
            && cudaOk(cudaMemcpyAsync(a.ids.ptr, bad.ids.data(), bad.ids.size() * 4, cudaMemcpyHostToDevice, s), "ids")
            && cudaOk(cudaGraphLaunch(exec, s), "launch") && cudaOk(cudaStreamSynchronize(s), "sync");
        expect(ok, cat(tag, ": a captured graph with the check replays ", rc == 0 ? "" : gLogger.lastError()));
        ok = ok && cudaOk(cudaMemcpyAsync(a.ids.ptr, good.ids.data(), good.ids.size() * 4, cudaMemcpyHostToDevice, s), "ids");
        gLogger.clear();
        r = ok ? enqueueLayer(pl.get(), l, a, in, out, workspace, s) : 0;
        expect(ok && r != 0 && gLogger.hasError({name, "holds -7", "row 2, slot 1", "CUDA graph replay"}),
            cat(tag, ": the next enqueue outside capture reports what the graph replay saw; last error: ",
                gLogger.lastError()));
        if (exec != nullptr)
            cudaOk(cudaGraphExecDestroy(exec), "cudaGraphExecDestroy");
        if (graph != nullptr)
            cudaOk(cudaGraphDestroy(graph), "cudaGraphDestroy");
    }
    cudaOk(cudaStreamDestroy(s), "cudaStreamDestroy");
}

// PTX of a "previous layer": lets dependent grids launch at once (griddepcontrol.launch_dependents,
// as a TensorRT kernel built for programmatic dependent launch may), waits `ns` nanoseconds
// (%globaltimer), then copies n16 16-byte words of src to dst through L2. A dependent that writes
// into src before this kernel has completed shows up in dst.
char const kPreviousLayerPtx[] = R"PTX(
.version 7.8
.target sm_90
.address_size 64

.visible .entry previous_layer_copy(.param .u64 src, .param .u64 dst, .param .u64 n16, .param .u64 ns)
{
    .reg .pred %p<3>;
    .reg .b32 %r<9>;
    .reg .b64 %rd<14>;

    griddepcontrol.launch_dependents;
    ld.param.u64 %rd1, [src];
    ld.param.u64 %rd2, [dst];
    ld.param.u64 %rd3, [n16];
    ld.param.u64 %rd4, [ns];
    mov.u64 %rd5, %globaltimer;
    add.u64 %rd6, %rd5, %rd4;
WAIT:
    mov.u64 %rd7, %globaltimer;
    setp.lt.u64 %p1, %rd7, %rd6;
    @%p1 bra WAIT;
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mov.u32 %r4, %nctaid.x;
    mul.wide.u32 %rd8, %r1, %r2;
    cvt.u64.u32 %rd9, %r3;
    add.u64 %rd8, %rd8, %rd9;
    mul.wide.u32 %rd10, %r4, %r2;
COPY:
    setp.ge.u64 %p2, %rd8, %rd3;
    @%p2 bra DONE;
    shl.b64 %rd11, %rd8, 4;
    add.u64 %rd12, %rd1, %rd11;
    add.u64 %rd13, %rd2, %rd11;
    ld.global.cg.v4.u32 {%r5, %r6, %r7, %r8}, [%rd12];
    st.global.v4.u32 [%rd13], {%r5, %r6, %r7, %r8};
    add.u64 %rd8, %rd8, %rd10;
    bra COPY;
DONE:
    ret;
}
)PTX";

//! The previous layer of the aliasing case: kPreviousLayerPtx loaded at run time (PTX JIT), and the
//! buffer it reads (`live`, bytes 1..255 only, so a cleared 32-bit word anywhere shows) and the
//! copy it makes of it.
struct PreviousLayer
{
    static constexpr size_t kBytes = 64 * 1024;
    cudaLibrary_t library{nullptr};
    cudaKernel_t kernel{nullptr};
    std::vector<uint8_t> pattern;
    DeviceBuffer live, copied;

    explicit PreviousLayer(std::mt19937& rng)
        : pattern(makePattern(rng))
        , live(pattern)
        , copied(kBytes)
    {
        if (cudaOk(cudaLibraryLoadData(&library, kPreviousLayerPtx, nullptr, nullptr, 0, nullptr, nullptr, 0),
                "cudaLibraryLoadData(previous layer PTX)"))
            cudaOk(cudaLibraryGetKernel(&kernel, library, "previous_layer_copy"), "cudaLibraryGetKernel");
    }
    ~PreviousLayer()
    {
        if (library != nullptr)
            cudaOk(cudaLibraryUnload(library), "cudaLibraryUnload");
    }
    PreviousLayer(PreviousLayer const&) = delete;
    PreviousLayer& operator=(PreviousLayer const&) = delete;

    static std::vector<uint8_t> makePattern(std::mt19937& rng)
    {
        std::vector<uint8_t> v(kBytes);
        for (auto& b : v)
            b = static_cast<uint8_t>(1 + rng() % 255);
        return v;
    }

    //! The previous layer (reads `live` 5 ms after it started, dependents may launch at once), then
    //! `enqueue` given `live` as its workspace, on `s`. Returns the first byte the previous layer did
    //! not read as given (kBytes: none), -1 on a CUDA error; `rc` is enqueue's return value.
    long long run(cudaStream_t s, std::function<int32_t(void*)> const& enqueue, int32_t& rc)
    {
        rc = -1;
        bool ok = kernel != nullptr && cudaOk(cudaMemsetAsync(copied.ptr, 0, kBytes, s), "clear the copy")
            && cudaOk(cudaMemcpyAsync(live.ptr, pattern.data(), kBytes, cudaMemcpyHostToDevice, s), "refill")
            && cudaOk(cudaStreamSynchronize(s), "sync");
        unsigned long long n16 = kBytes / 16, ns = 5000000;
        void* src = live.ptr;
        void* dst = copied.ptr;
        void* args[] = {&src, &dst, &n16, &ns};
        ok = ok
            && cudaOk(cudaLaunchKernel(reinterpret_cast<void const*>(kernel), dim3(16), dim3(256), args, 0, s),
                "launch the previous layer");
        if (ok)
            rc = enqueue(live.ptr);
        if (!(cudaOk(cudaStreamSynchronize(s), "sync") && ok))
            return -1;
        std::vector<uint8_t> seen = copied.read();
        for (size_t i = 0; i < kBytes; ++i)
            if (seen[i] != pattern[i])
                return static_cast<long long>(i);
        return static_cast<long long>(kBytes);
    }
};

//! TensorRT hands a layer scratch memory that earlier layers used, assuming stream order; under
//! programmatic dependent launch an earlier kernel may still be reading it when this layer's first
//! kernel starts. Here the previous layer (PreviousLayer) lets dependents launch at once and reads
//! its buffer 5 ms later, and a one-row enqueue gets that buffer as its workspace: the previous
//! layer must still read exactly what it was given, and y must be right. First a control: the
//! kernels called directly with that buffer declared exclusive (what the plugin did before the fix
//! of issue 23, when the one-row shrink cleared its flag there before waiting for the previous
//! kernel) must show the overwrite, so the case can fail. Then each plugin, a build-time instance
//! (TensorRT's timing runs: never attached) and an attached one.
void workspaceAliasCase(std::mt19937& rng)
{
    std::printf("[one-row workspace aliasing the previous layer's live buffer]\n");
    Cfg const c{256, 192, 4, 8, 2, 2.0F, 1}; // one row on the shrink + GEMV pair that shares a flag
    DataType const t = DataType::kFLOAT;
    Layer l = makeLayer(c, t, rng);
    PreviousLayer prev(rng);
    cudaStream_t s = nullptr;
    if (prev.kernel == nullptr || !cudaOk(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream"))
        return;
    Activations a(c, t, 1);
    DeviceBuffer ownWorkspace(PreviousLayer::kBytes);
    size_t const wsBytes = adafuse_lora_linear_workspace_size(1, c.in, c.out, c.experts, c.rank, c.topK);
    PluginTensorDesc out{};
    std::vector<PluginTensorDesc> in = runtimeDescs(c, t, {1}, out);

    // Control: the kernels with the aliased buffer declared exclusive (the hazard, on purpose).
    {
        std::vector<std::vector<uint8_t>> keep;
        HostRun run;
        auto direct = [&](void* ws, int32_t exclusive) {
            adafuse_lora_options o{};
            o.exclusive_workspace = exclusive;
            return adafuse_lora_linear(ADAFUSE_FLOAT32, 1, c.in, c.out, a.x.ptr, l.W->ptr, l.bias->ptr, l.A->ptr,
                l.B->ptr, c.experts, c.rank, static_cast<int32_t const*>(a.ids.ptr),
                static_cast<float const*>(a.gates.ptr), c.topK, c.scale, a.y.ptr, ws, wsBytes, &o, s);
        };
        bool ok = stage(l, a, run, 1, makeRoute(c, 1, rng), rng, s, keep)
            && direct(ownWorkspace.ptr, 1) == ADAFUSE_OK && cudaOk(cudaStreamSynchronize(s), "sync"); // warm-up
        int32_t rc = -1;
        long long const bad = ok ? prev.run(s, [&](void* ws) { return direct(ws, 1); }, rc) : -1;
        expect(ok && rc == ADAFUSE_OK && bad >= 0 && bad < static_cast<long long>(PreviousLayer::kBytes),
            cat("control: a shrink launched early into the aliased buffer overwrites what the previous layer reads",
                " (first byte changed: ", bad, "; the case can fail)"));
    }

    for (auto const& name : kPluginNames)
    {
        Fields f(c);
        PluginPtr buildLayer = create(name, f.fc(), TensorRTPhase::kBUILD);
        PluginPtr engineLayer = create(name, f.fc(), TensorRTPhase::kRUNTIME);
        HarnessResourceContext resources;
        PluginPtr attachedLayer(engineLayer ? runtime(engineLayer.get())->attachToContext(&resources) : nullptr);
        expect(buildLayer != nullptr && attachedLayer != nullptr,
            cat(name, ": build-time and attached instances ", gLogger.lastError()));
        for (auto const& [kind, plugin] : {std::pair<char const*, IPluginV3*>{"build-time", buildLayer.get()},
                 std::pair<char const*, IPluginV3*>{"attached", attachedLayer.get()}})
        {
            if (plugin == nullptr)
                continue;
            std::string const tag = cat(name, " (", kind, ") one-row workspace aliasing the previous layer's buffer");
            std::vector<std::vector<uint8_t>> keep;
            HostRun run;
            // Warm-up in stream order with a workspace of its own: modules loaded, caches filled, so
            // that the aliased enqueue below is issued well within the previous layer's 5 ms.
            bool ok = runtime(plugin)->onShapeChange(in.data(), c.nbInputs(), &out, 1) == 0
                && stage(l, a, run, 1, makeRoute(c, 1, rng), rng, s, keep)
                && enqueueLayer(plugin, l, a, in, out, ownWorkspace, s) == 0
                && cudaOk(cudaStreamSynchronize(s), "sync");
            ok = ok && stage(l, a, run, 1, makeRoute(c, 1, rng), rng, s, keep);
            int32_t rc = -1;
            long long const bad = !ok ? -1 : prev.run(s, [&](void* ws) {
                std::vector<void const*> inPtrs = {a.x.ptr, l.W->ptr, l.A->ptr, l.B->ptr, a.ids.ptr, a.gates.ptr};
                if (c.hasBias)
                    inPtrs.push_back(l.bias->ptr);
                void* outPtrs[1] = {a.y.ptr};
                return runtime(plugin)->enqueue(in.data(), &out, inPtrs.data(), outPtrs, ws, s);
            }, rc);
            expect(ok && rc == 0, cat(tag, ": enqueue ran ", rc == 0 ? "" : gLogger.lastError()));
            if (!ok || rc != 0)
                continue;
            expect(bad == static_cast<long long>(PreviousLayer::kBytes),
                cat(tag, ": the previous layer read what it was given",
                    bad == static_cast<long long>(PreviousLayer::kBytes) ? "" : cat(" - byte ", bad, " was overwritten")));
            double const err = relError(l, a, run);
            expect(err <= tolerance(t), cat(tag, ": y max rel err ", err, " (tol ", tolerance(t), ")"));
        }
    }
    cudaOk(cudaStreamDestroy(s), "cudaStreamDestroy");
}

void gpuChecks(bool debugChecks)
{
    int count = 0;
    if (!cudaOk(cudaGetDeviceCount(&count), "cudaGetDeviceCount") || count == 0)
    {
        expect(false, "--gpu needs a CUDA device");
        return;
    }
    cudaDeviceProp prop{};
    cudaOk(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    int runtimeVersion = 0, driverVersion = 0;
    cudaOk(cudaRuntimeGetVersion(&runtimeVersion), "cudaRuntimeGetVersion");
    cudaOk(cudaDriverGetVersion(&driverVersion), "cudaDriverGetVersion");
    std::printf("[gpu] device 0: %s (sm_%d%d), CUDA runtime %d, driver %d\n", prop.name, prop.major, prop.minor,
        runtimeVersion, driverVersion);
    std::mt19937 rng(1234);
    if (debugChecks)
    {
        for (auto const& name : kPluginNames)
            expertIdContract(name, true, rng);
        return;
    }
    // Configurations: aligned sizes with bias and a 3000-row prefill (two 2048-row chunks);
    // odd, unaligned sizes without bias and a 2200-row prefill; wider experts and rank.
    std::vector<ReplayCase> cases = {{{256, 192, 4, 8, 2, 2.0F, 1}, {2, 1500}},
        {{100, 70, 3, 4, 1, 0.5F, 0}, {2, 1100}}, {{1024, 512, 8, 16, 2, 2.0F, 1}, {2, 40}}};
    Scoreboard board;
    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
        for (auto const& name : kPluginNames)
            for (ReplayCase const& rc : cases)
                replayLifecycle(name, rc, t, rng, board);
    // FP8 W (weight_dtype 1, the kernels' ADAFUSE_WEIGHT_FP8_E4M3 path): AdafuseLoraLinear only (the switch refuses
    // it), 16-bit x; in_features % 16 == 0. The float64 reference multiplies the e4m3 values times their scales.
    std::vector<ReplayCase> const fp8Cases = {{{256, 192, 4, 8, 2, 2.0F, 1, 1}, {2, 1500}},
        {{1024, 512, 8, 16, 2, 2.0F, 0, 1}, {2, 40}}};
    for (DataType t : {DataType::kHALF, DataType::kBF16})
        for (ReplayCase const& rc : fp8Cases)
            replayLifecycle("AdafuseLoraLinear", rc, t, rng, board);
    for (auto const& name : kPluginNames)
        expertIdContract(name, false, rng);
    if (prop.major >= 9)
    {
        workspaceAliasCase(rng);
    }
    else
    {
        std::printf("[workspace aliasing] not run: programmatic dependent launch needs sm_90, device is sm_%d%d\n",
            prop.major, prop.minor);
    }
    std::printf("[gpu] max rel error (max|y-ref|/max|ref|, float64 reference), every lifecycle step:\n");
    for (auto const& kv : board.worst)
    {
        std::string dtype = kv.first.substr(kv.first.find(' ') + 1);
        DataType t = dtype == "float32" ? DataType::kFLOAT : (dtype == "float16" ? DataType::kHALF : DataType::kBF16);
        std::printf("  %-32s %.3e  (tol %.0e)  %s\n", kv.first.c_str(), kv.second, tolerance(t),
            kv.second <= tolerance(t) ? "PASS" : "FAIL");
    }
}

} // namespace

int main(int argc, char** argv)
{
    bool gpu = false;
    bool debugChecks = false;
    std::string lib = ADAFUSE_PLUGIN_LIBRARY_PATH;
    for (int i = 1; i < argc; ++i)
    {
        std::string a = argv[i];
        if (a == "--gpu")
            gpu = true;
        else if (a == "--check-expert-ids")
            debugChecks = true;
        else if (a == "--verbose" || a == "-v")
            gVerbose = true;
        else if (a == "--lib" && i + 1 < argc)
            lib = argv[++i];
        else
        {
            std::fprintf(stderr, "usage: %s [--gpu [--check-expert-ids]] [--lib PATH] [--verbose]\n", argv[0]);
            return 2;
        }
    }
    if (debugChecks && !gpu)
    {
        std::fprintf(stderr, "usage: --check-expert-ids needs --gpu\n");
        return 2;
    }
    if (debugChecks)
    {
        // Read once by the library (ExpertIdCheck::enabled), so set before it is loaded.
        setenv("ADAFUSE_CHECK_EXPERT_IDS", "1", 1);
    }
    std::printf("adafuse plugin harness: %s (mode: %s)\n", lib.c_str(), gpu ? "cpu + gpu" : "cpu only");
    void* handle = dlopen(lib.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr)
    {
        std::fprintf(stderr, "cannot load %s: %s\n", lib.c_str(), dlerror());
        return 2;
    }
    checkCreators(handle);
    if (gCreators.size() == kPluginNames.size())
    {
        for (auto const& name : kPluginNames)
        {
            checkBadFields(name);
            for (Cfg const& c : cpuConfigs(name))
                checkPlugin(name, c);
        }
        if (gpu)
            gpuChecks(debugChecks);
    }
    std::printf("harness summary: %d checks ok, %d failed\n", gPassed, gFailed);
    // The library stays loaded: creators are static objects inside it.
    return gFailed == 0 ? 0 : 1;
}
