#include "manifest.h"

#include <cstdio>
#include <map>

#include "error.h"
#include "files.h"

namespace adafuse {
namespace fs = std::filesystem;
using nlohmann::json;

std::string python_repr(const json& value) {
  if (value.is_null()) return "None";
  if (value.is_boolean()) return value.get<bool>() ? "True" : "False";
  if (value.is_string()) return "'" + value.get<std::string>() + "'";
  return value.dump();
}

// Python's str() of a JSON scalar (an f-string's {value}).
static std::string python_str(const json& value) {
  return value.is_string() ? value.get<std::string>() : python_repr(value);
}

// Python's type(value).__name__ of a parsed JSON value.
static std::string python_type(const json& value) {
  if (value.is_object()) return "dict";
  if (value.is_array()) return "list";
  if (value.is_string()) return "str";
  if (value.is_boolean()) return "bool";
  if (value.is_number_float()) return "float";
  if (value.is_number()) return "int";
  return "NoneType";
}

// Python's json.dumps (default separators, ensure_ascii) of a parsed value, for messages.
static std::string python_dumps(const json& v) {
  if (v.is_object()) {
    std::string out = "{";
    for (auto it = v.begin(); it != v.end(); ++it)
      out += (it == v.begin() ? "" : ", ") + python_dumps(json(it.key())) + ": " + python_dumps(it.value());
    return out + "}";
  }
  if (v.is_array()) {
    std::string out = "[";
    for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + python_dumps(v[i]);
    return out + "]";
  }
  if (v.is_string()) {
    // ensure_ascii: everything outside printable ASCII as \uXXXX (UTF-16, surrogate pairs above U+FFFF)
    const std::string& text = v.get_ref<const std::string&>();
    std::string out = "\"";
    char hex[16];
    for (size_t i = 0; i < text.size();) {
      const unsigned char c = static_cast<unsigned char>(text[i]);
      uint32_t cp = c;
      size_t n = 1;
      if (c >= 0xf0) n = 4, cp = c & 0x07;
      else if (c >= 0xe0) n = 3, cp = c & 0x0f;
      else if (c >= 0xc0) n = 2, cp = c & 0x1f;
      for (size_t k = 1; k < n && i + k < text.size(); ++k) cp = (cp << 6) | (static_cast<unsigned char>(text[i + k]) & 0x3f);
      i += n;
      if (cp == '"') out += "\\\"";
      else if (cp == '\\') out += "\\\\";
      else if (cp == '\n') out += "\\n";
      else if (cp == '\r') out += "\\r";
      else if (cp == '\t') out += "\\t";
      else if (cp == '\b') out += "\\b";
      else if (cp == '\f') out += "\\f";
      else if (cp >= 0x20 && cp < 0x7f) out += static_cast<char>(cp);
      else if (cp > 0xffff) {
        cp -= 0x10000;
        std::snprintf(hex, sizeof(hex), "\\u%04x\\u%04x", 0xd800 + (cp >> 10), 0xdc00 + (cp & 0x3ff));
        out += hex;
      } else {
        std::snprintf(hex, sizeof(hex), "\\u%04x", cp);
        out += hex;
      }
    }
    return out + "\"";
  }
  if (v.is_null()) return "null";
  return v.dump();  // numbers and booleans are spelt alike
}

const TensorDesc* Manifest::input(const std::string& name) const {
  for (const auto& t : inputs)
    if (t.name == name) return &t;
  return nullptr;
}

const TensorDesc* Manifest::output(const std::string& name) const {
  for (const auto& t : outputs)
    if (t.name == name) return &t;
  return nullptr;
}

const json& lookup(const json& root, std::initializer_list<const char*> keys) {
  static const json null_value;
  const json* cur = &root;
  for (const char* key : keys) {
    if (!cur->is_object() || !cur->contains(key)) return null_value;
    cur = &(*cur)[key];
  }
  return *cur;
}

void FieldReader::bad(const std::string& field, const std::string& expected, const json& found) const {
  fail(ADAFUSE_ERR_FILE, where_ + ": field '" + field + "' must be " + expected + ", found " + found.dump());
}

std::string FieldReader::text(const json& root, std::initializer_list<const char*> keys, const std::string& field) const {
  const json& v = lookup(root, keys);
  if (!v.is_string()) bad(field, "a string", v);
  return v.get<std::string>();
}

int32_t FieldReader::positive(const json& root, std::initializer_list<const char*> keys, const std::string& field) const {
  const json& v = lookup(root, keys);
  if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > INT32_MAX) bad(field, "a positive integer", v);
  return static_cast<int32_t>(v.get<int64_t>());
}

std::vector<TensorDesc> FieldReader::tensors(const json& root, const char* kind) const {
  const std::string field = std::string("tensors.") + kind;
  const json& list = lookup(root, {"tensors", kind});
  if (!list.is_array() || list.empty()) bad(field, "a non-empty list", list);
  std::vector<TensorDesc> out;
  for (const json& t : list) {
    if (!t.is_object() || !t.contains("name") || !t["name"].is_string() || !t.contains("dtype") ||
        !t["dtype"].is_string() || !t.contains("shape") || !t["shape"].is_array())
      bad(field, "a list of {name, dtype, shape}", t);
    TensorDesc d{t["name"].get<std::string>(), t["dtype"].get<std::string>(), {}};
    for (const json& dim : t["shape"]) {
      if (!dim.is_number_integer() || dim.get<int64_t>() < -1) bad(field + "." + d.name + ".shape", "integers >= -1", t["shape"]);
      d.shape.push_back(dim.get<int64_t>());
    }
    out.push_back(std::move(d));
  }
  return out;
}

namespace {

void parse_fields(Manifest& m) {
  const json& j = m.json;
  FieldReader r(m.manifest_path);
  m.backend = r.text(j, {"engine", "backend"}, "engine.backend");
  m.backend_version = r.text(j, {"engine", "backend_version"}, "engine.backend_version");
  m.dtype = r.text(j, {"engine", "dtype"}, "engine.dtype");
  m.version_compatible = lookup(j, {"engine", "version_compatible"}).is_boolean() &&
                         lookup(j, {"engine", "version_compatible"}).get<bool>();  // its type: check_types
  m.kv_in_place = lookup(j, {"engine", "kv_in_place"}).is_boolean() && lookup(j, {"engine", "kv_in_place"}).get<bool>();
  m.max_batch = r.positive(j, {"engine", "max_batch"}, "engine.max_batch");
  m.max_seq = r.positive(j, {"engine", "max_seq"}, "engine.max_seq");
  m.inputs = r.tensors(j, "inputs");
  m.outputs = r.tensors(j, "outputs");
  if (!lookup(j, {"profiles"}).is_array() || lookup(j, {"profiles"}).size() != 2)
    r.bad("profiles", "a list of two profiles (0 prefill, 1 decode)", lookup(j, {"profiles"}));
  m.routing_kind = r.text(j, {"routing", "kind"}, "routing.kind");
  const json& k = lookup(j, {"routing", "top_k"});
  if (!k.is_null()) m.top_k = r.positive(j, {"routing", "top_k"}, "routing.top_k");
  const json& routes = lookup(j, {"routing", "routes_file"});
  if (!routes.is_null())  // confined to the engine's folder, as the files the manifest lists are
    m.routes_file = confine(m.engine_path.parent_path(), r.text(j, {"routing", "routes_file"}, "routing.routes_file"),
                            m.manifest_path.string());
  const json& experts = lookup(j, {"routing", "num_experts"});
  if (!experts.is_null()) m.num_experts = r.positive(j, {"routing", "num_experts"}, "routing.num_experts");
  const json& plugin = lookup(j, {"plugin"});
  if (!plugin.is_null())
    m.plugin = PluginDesc{r.text(j, {"plugin", "library"}, "plugin.library"), r.text(j, {"plugin", "name"}, "plugin.name"),
                          r.text(j, {"plugin", "version"}, "plugin.version")};
}

// trt/manifest.py FIELD_TYPES / _check_types: the fields Python reads, with their JSON types.
enum class Want { str, integer, boolean, str_or_null };
struct FieldType {
  const char* section;
  const char* key;
  Want want;
};
constexpr FieldType kFieldTypes[] = {
    {"engine", "file", Want::str},           {"engine", "sha256", Want::str},
    {"engine", "backend", Want::str},        {"engine", "backend_version", Want::str},
    {"engine", "flavour", Want::str},        {"engine", "dtype", Want::str},
    {"engine", "max_batch", Want::integer},  {"engine", "max_seq", Want::integer},
    {"engine", "version_compatible", Want::boolean}, {"engine", "kv_in_place", Want::boolean},
    {"routing", "kind", Want::str},          {"routing", "num_experts", Want::integer},
    {"routing", "top_k", Want::integer},     {"routing", "routes_file", Want::str_or_null},
    {"routing", "pregate_graph", Want::str_or_null},
    {"plugin", "library", Want::str},        {"plugin", "name", Want::str},
    {"plugin", "strategy", Want::str},       {"plugin", "version", Want::str},
    {"source", "path", Want::str},           {"source", "format", Want::str},
    {"source", "index_sha256", Want::str}};

void check_types(const json& j, const std::string& mpath) {
  for (const char* section : {"engine", "routing", "plugin", "source"}) {
    if (!j.contains(section) || j[section].is_null()) continue;
    const json& values = j[section];
    if (!values.is_object()) fail(ADAFUSE_ERR_FILE, mpath + ": '" + section + "' must be an object, found " + python_type(values));
    for (const FieldType& f : kFieldTypes) {
      if (std::string(f.section) != section || !values.contains(f.key)) continue;
      const json& v = values[f.key];
      const bool ok = f.want == Want::integer   ? v.is_number_integer()
                      : f.want == Want::boolean ? v.is_boolean()
                      : f.want == Want::str     ? v.is_string()
                                                : (v.is_string() || v.is_null());
      const char* expected = f.want == Want::integer   ? "int"
                             : f.want == Want::boolean ? "bool"
                             : f.want == Want::str     ? "str"
                                                       : "str or null";
      if (!ok)
        fail(ADAFUSE_ERR_FILE, mpath + ": '" + section + "." + f.key + "' must be " + expected + ", found " + python_type(v) +
                                   " " + python_dumps(v).substr(0, 40));
    }
  }
}

}  // namespace

Manifest verify_engine(const fs::path& engine, bool check_files) {
  Manifest m;
  m.engine_path = engine;
  m.manifest_path = fs::path(engine).replace_extension(".json");
  const std::string mpath = m.manifest_path.string();
  std::error_code exists_ec;
  if (!fs::exists(fs::symlink_status(m.manifest_path, exists_ec)))  // absent, not even a broken link
    fail(ADAFUSE_ERR_FILE, engine.string() + ": its manifest " + mpath +
                               " is missing (adafuse-export convert writes it beside the engine; the engine cannot be "
                               "checked or run without it: convert again)");
  m.json = read_json(m.manifest_path);  // regular file, at most 64 MiB, nested at most 32 deep
  const json& j = m.json;
  if (!j.is_object() || lookup(j, {"format"}) != kManifestFormat)
    fail(ADAFUSE_ERR_FILE, mpath + ": not an adafuse engine manifest (expected format '" + kManifestFormat + "')");
  if (lookup(j, {"version"}) != kManifestVersion)
    fail(ADAFUSE_ERR_FILE, mpath + ": manifest version " + python_repr(lookup(j, {"version"})) +
                               " is not supported (expected " + std::to_string(kManifestVersion) + ")");
  std::error_code ec;
  if (!fs::is_regular_file(engine, ec)) fail(ADAFUSE_ERR_FILE, engine.string() + ": engine file not found");
  for (const char* key : {"engine", "plugin"}) {
    const json& v = lookup(j, {key});
    if (!v.is_null() && !v.is_object())
      fail(ADAFUSE_ERR_FILE, mpath + ": '" + key + "' must be an object, found " + python_type(v));
  }
  check_types(j, mpath);
  const json& want = lookup(j, {"engine", "sha256"});
  const std::string got = sha256_file(engine);
  if (want != got) {
    const std::string want_text = python_str(want);
    fail(ADAFUSE_ERR_FILE, engine.string() + ": SHA-256 " + got.substr(0, 16) + "... does not match the manifest's " +
                               want_text.substr(0, 16) +
                               "... (engine modified or replaced; rebuild it with adafuse-export convert)");
  }
  const json& plugin = lookup(j, {"plugin"});
  // Python: `if plugin and ...`: an empty object or null means no plugin.
  const bool has_plugin = plugin.is_object() && !plugin.empty();
  if (has_plugin) {
    const json& name = lookup(plugin, {"name"});
    bool known = false;
    std::string provided;
    for (const char* op : kPluginOpTypes) {
      known = known || name == op;
      provided += (provided.empty() ? "" : " and ") + std::string(op);
    }
    if (!known)
      fail(ADAFUSE_ERR_PLUGIN, mpath + ": engine needs plugin " + python_repr(name) + ", this adafuse-export provides " + provided);
    if (lookup(plugin, {"version"}) != kPluginVersion)
      fail(ADAFUSE_ERR_PLUGIN, mpath + ": engine needs plugin " + python_str(name) + " version " +
                                   python_repr(lookup(plugin, {"version"})) + ", this adafuse-export provides version '" +
                                   kPluginVersion + "'");
  }
  if (check_files) verify_listed_files(j, engine.parent_path(), m.manifest_path);
  parse_fields(m);
  return m;
}

void verify_listed_files(const json& j, const fs::path& folder, const fs::path& manifest_path) {
  const std::string mpath = manifest_path.string();
  std::error_code ec;
    const json* files = &lookup(j, {"files"});
  static const json no_files = json::object();
  if (!j.contains("files")) files = &no_files;  // Python: manifest.get("files", {})
  bool ok = files->is_object();
  if (ok)
    for (const auto& item : files->items()) ok = ok && item.value().is_string();
  if (!ok) fail(ADAFUSE_ERR_FILE, mpath + ": 'files' must map file names to SHA-256 strings");
  // Every name first: confined, present, and each file listed once (one file under many spellings
  // would be hashed many times), before any hashing.
  std::map<fs::path, std::string> listed;
  for (const auto& item : files->items()) {
    const std::string& rel = item.key();
    // A manifest may name only files in its folder; FIFOs and devices are "missing" (never opened).
    const fs::path f = confine(folder, rel, mpath);
    if (!fs::is_regular_file(f, ec))
      fail(ADAFUSE_ERR_FILE, f.string() + ": file listed in " + manifest_path.filename().string() + " is missing");
    const fs::path real = fs::weakly_canonical(fs::absolute(f, ec), ec);
    auto [at, fresh] = listed.emplace(real, rel);
    if (!fresh)
      fail(ADAFUSE_ERR_FILE, mpath + ": 'files' lists one file twice (" + python_repr(json(at->second)) + " and " +
                                 python_repr(json(rel)) + ")");
  }
  for (const auto& [rel, digest] : files->items()) {
    const fs::path f = confine(folder, rel, mpath);
    if (digest != sha256_file(f))
      fail(ADAFUSE_ERR_FILE, f.string() + ": SHA-256 does not match " + manifest_path.filename().string() +
                                 " (file modified after conversion)");
  }
}

}  // namespace adafuse
