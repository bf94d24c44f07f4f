#include "safetensors.h"

#include <nlohmann/json.hpp>

#include "error.h"
#include "files.h"

namespace adafuse {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull * 1024 * 1024;  // the safetensors spec's own limit

int dtype_size(const std::string& code) {
  static const std::map<std::string, int> sizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2}, {"I8", 1},
      {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"U16", 2}, {"U32", 4}, {"U64", 8}};
  auto it = sizes.find(code);
  return it == sizes.end() ? 0 : it->second;
}

// nlohmann keeps the last of duplicate keys silently: reject them while parsing.
nlohmann::json parse_header(const std::string& raw, const std::string& where) {
  std::vector<std::vector<std::string>> keys_per_object;
  auto callback = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if (event == E::object_start) keys_per_object.emplace_back();
    if (event == E::object_end) keys_per_object.pop_back();
    if (event == E::key && depth == 1) {
      const std::string key = parsed.get<std::string>();
      for (const auto& seen : keys_per_object.back())
        if (seen == key) fail(ADAFUSE_ERR_FILE, where + ": duplicate tensor name '" + key + "' in the safetensors header");
      keys_per_object.back().push_back(key);
    }
    return true;
  };
  try {
    return nlohmann::json::parse(raw, callback);
  } catch (const nlohmann::json::exception& e) {
    fail(ADAFUSE_ERR_FILE, where + ": corrupt safetensors header: not valid UTF-8 JSON (" + e.what() + ")");
  }
}

}  // namespace

int64_t SafeTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : path_(path) {
  const std::string where = path.string();
  const std::string bytes = read_file(path, "safetensors file");
  const uint64_t size = bytes.size();
  if (size < 8)
    fail(ADAFUSE_ERR_FILE, where + ": truncated safetensors file: " + std::to_string(size) + " bytes, expected at least 8");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[static_cast<size_t>(i)]);
  if (n > size - 8)
    fail(ADAFUSE_ERR_FILE, where + ": corrupt safetensors file: header length " + std::to_string(n) +
                               " is larger than the " + std::to_string(size - 8) + " bytes after it");
  if (n > kMaxHeaderBytes)
    fail(ADAFUSE_ERR_FILE, where + ": corrupt safetensors file: header length " + std::to_string(n) + " exceeds " +
                               std::to_string(kMaxHeaderBytes));
  nlohmann::json header = parse_header(bytes.substr(8, n), where);
  if (!header.is_object())
    fail(ADAFUSE_ERR_FILE, where + ": corrupt safetensors header: expected a JSON object, found " + header.type_name());
  const uint64_t data_size = size - 8 - n;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string at = where + ": tensor '" + name + "'";
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets"))
      fail(ADAFUSE_ERR_FILE, at + ": header entry must have dtype, shape and data_offsets, found " + entry.dump());
    const auto& dtype = entry["dtype"];
    if (!dtype.is_string() || dtype_size(dtype.get<std::string>()) == 0)
      fail(ADAFUSE_ERR_FILE, at + ": dtype " + dtype.dump() + " is not supported");
    SafeTensor t{dtype.get<std::string>(), {}, {}};
    const auto& shape = entry["shape"];
    bool shape_ok = shape.is_array();
    uint64_t expected = static_cast<uint64_t>(dtype_size(t.dtype));
    for (const auto& d : shape_ok ? shape : nlohmann::json::array()) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > (1ull << 40)) {
        shape_ok = false;
        break;
      }
      t.shape.push_back(d.get<int64_t>());
      expected *= d.get<uint64_t>();
      if (expected > (1ull << 50)) shape_ok = false;
    }
    if (!shape_ok) fail(ADAFUSE_ERR_FILE, at + ": shape must be a list of non-negative integers, found " + shape.dump());
    const auto& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_integer() || !offsets[1].is_number_integer())
      fail(ADAFUSE_ERR_FILE, at + ": data_offsets must be two integers, found " + offsets.dump());
    const int64_t begin = offsets[0].get<int64_t>(), end = offsets[1].get<int64_t>();
    if (!(0 <= begin && begin <= end && static_cast<uint64_t>(end) <= data_size))
      fail(ADAFUSE_ERR_FILE, at + ": data_offsets " + offsets.dump() + " lie outside the " + std::to_string(data_size) +
                                 " data bytes (file truncated?)");
    if (static_cast<uint64_t>(end - begin) != expected)
      fail(ADAFUSE_ERR_FILE, at + ": data_offsets span " + std::to_string(end - begin) + " bytes, expected " +
                                 std::to_string(expected) + " for " + t.dtype + " " + shape.dump());
    t.data = bytes.substr(8 + n + static_cast<uint64_t>(begin), static_cast<size_t>(end - begin));
    tensors_.emplace(name, std::move(t));
  }
}

const SafeTensor& SafetensorsFile::get(const std::string& name, const std::string& dtype, size_t rank) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail(ADAFUSE_ERR_FILE, path_.string() + ": tensor '" + name + "' not found");
  const SafeTensor& t = it->second;
  if (t.dtype != dtype || t.shape.size() != rank)
    fail(ADAFUSE_ERR_FILE, path_.string() + ": tensor '" + name + "' is " + t.dtype + " of rank " +
                               std::to_string(t.shape.size()) + ", expected " + dtype + " of rank " + std::to_string(rank));
  return t;
}

}  // namespace adafuse
