#include "safetensors.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <set>
#include <tuple>

#include "error.h"
#include "files.h"

namespace adafuse {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull * 1024 * 1024;  // the safetensors spec's own limit
constexpr size_t kMaxRank = 8;                               // tensors.py MAX_RANK

int dtype_size(const std::string& code) {
  static const std::map<std::string, int> sizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2}, {"I8", 1},
      {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"U16", 2}, {"U32", 4}, {"U64", 8}};
  auto it = sizes.find(code);
  return it == sizes.end() ? 0 : it->second;
}

// nlohmann keeps the last of duplicate keys silently: reject them while parsing.
nlohmann::json parse_header(const std::string& raw, const std::string& where) {
  std::vector<std::set<std::string>> keys_per_object;
  auto callback = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if (event == E::object_start) keys_per_object.emplace_back();
    if (event == E::object_end) keys_per_object.pop_back();
    if (event == E::key && depth == 1) {
      const std::string key = parsed.get<std::string>();
      if (!keys_per_object.back().insert(key).second)
        fail(ADAFUSE_ERR_FILE, where + ": duplicate tensor name '" + key + "' in the safetensors header");
    }
    return true;
  };
  if (json_depth(raw, kMaxJsonDepth) > kMaxJsonDepth)
    fail(ADAFUSE_ERR_FILE, where + ": corrupt safetensors header: nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
  try {
    return nlohmann::json::parse(raw, callback);
  } catch (const nlohmann::json::exception& e) {
    fail(ADAFUSE_ERR_FILE, where + ": corrupt safetensors header: not valid UTF-8 JSON (" + e.what() + ")");
  }
}

}  // namespace

size_t SafeTensor::bytes() const { return static_cast<size_t>(numel()) * static_cast<size_t>(dtype_size(dtype)); }

int64_t SafeTensor::numel() const {
  uint64_t n = 1;
  for (int64_t d : shape) n = checked_mul(n, static_cast<uint64_t>(d), "tensor shape product");
  return static_cast<int64_t>(n);
}

namespace {

std::string short_dump(const nlohmann::json& value) {
  const std::string text = value.dump();
  return text.size() <= 60 ? text : text.substr(0, 57) + "...";
}

// A JSON integer >= 0 as uint64 (false for anything else).
bool unsigned_value(const nlohmann::json& v, uint64_t& out) {
  if (!v.is_number_unsigned()) return false;
  out = v.get<uint64_t>();
  return true;
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path, Contents contents) : path_(path) {
  const std::string where = path.string();
  // A regular file only (a FIFO or device is refused before anything blocks), read by offsets
  // checked against its size: nothing beyond the header and the tensors' own bytes is read.
  RegularFile file(path, "safetensors file");
  const uint64_t size = file.size();
  if (size < 8)
    fail(ADAFUSE_ERR_FILE, where + ": truncated safetensors file: " + std::to_string(size) + " bytes, expected at least 8");
  unsigned char head[8];
  file.read_at(0, reinterpret_cast<char*>(head), 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | head[i];
  if (n > size - 8)
    fail(ADAFUSE_ERR_FILE, where + ": corrupt safetensors file: header length " + std::to_string(n) +
                               " is larger than the " + std::to_string(size - 8) + " bytes after it");
  if (n > kMaxHeaderBytes)
    fail(ADAFUSE_ERR_FILE, where + ": corrupt safetensors file: header length " + std::to_string(n) + " exceeds " +
                               std::to_string(kMaxHeaderBytes));
  std::string raw(static_cast<size_t>(n), '\0');
  file.read_at(8, raw.data(), n);
  nlohmann::json header = parse_header(raw, where);
  if (!header.is_object())
    fail(ADAFUSE_ERR_FILE, where + ": corrupt safetensors header: expected a JSON object, found " + header.type_name());
  const uint64_t data_size = size - 8 - n;
  std::vector<std::tuple<uint64_t, uint64_t, std::string>> spans;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      bool ok = entry.is_null() || entry.is_object();
      if (entry.is_object())
        for (const auto& item : entry.items()) ok = ok && item.value().is_string();
      if (!ok) fail(ADAFUSE_ERR_FILE, where + ": corrupt safetensors header: __metadata__ must map strings to strings");
      continue;
    }
    const std::string at = where + ": tensor '" + name + "'";
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets"))
      fail(ADAFUSE_ERR_FILE, at + ": header entry must have dtype, shape and data_offsets, found " + short_dump(entry));
    const auto& dtype = entry["dtype"];
    if (!dtype.is_string() || dtype_size(dtype.get<std::string>()) == 0)
      fail(ADAFUSE_ERR_FILE, at + ": dtype " + short_dump(dtype) + " is not supported");
    SafeTensor t{dtype.get<std::string>(), {}, {}};
    const auto& shape = entry["shape"];
    // tensors.py: at most 8 dims, each no larger than the data; the product is then checked in 64 bits.
    bool shape_ok = shape.is_array() && shape.size() <= kMaxRank;
    uint64_t expected = static_cast<uint64_t>(dtype_size(t.dtype));
    bool overflow = false;
    for (const auto& d : shape_ok ? shape : nlohmann::json::array()) {
      uint64_t dim = 0;
      if (!unsigned_value(d, dim) || dim > data_size) {
        shape_ok = false;
        break;
      }
      t.shape.push_back(static_cast<int64_t>(dim));
      overflow = overflow || __builtin_mul_overflow(expected, dim, &expected);
    }
    if (!shape_ok)
      fail(ADAFUSE_ERR_FILE, at + ": shape must be a list of at most " + std::to_string(kMaxRank) +
                                 " non-negative integers no larger than the file, found " + short_dump(shape));
    const auto& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_integer() || !offsets[1].is_number_integer())
      fail(ADAFUSE_ERR_FILE, at + ": data_offsets must be two integers, found " + short_dump(offsets));
    uint64_t begin = 0, end = 0;
    if (!unsigned_value(offsets[0], begin) || !unsigned_value(offsets[1], end) || begin > end || end > data_size)
      fail(ADAFUSE_ERR_FILE, at + ": data_offsets " + short_dump(offsets) + " lie outside the " + std::to_string(data_size) +
                                 " data bytes (file truncated?)");
    if (overflow)
      fail(ADAFUSE_ERR_FILE, at + ": shape " + short_dump(shape) + " of " + t.dtype + " has more bytes than 64 bits count");
    if (end - begin != expected)
      fail(ADAFUSE_ERR_FILE, at + ": data_offsets span " + std::to_string(end - begin) + " bytes, expected " +
                                 std::to_string(expected) + " for " + t.dtype + " " + shape.dump());
    if (end > begin) spans.emplace_back(begin, end, name);
    t.offset = 8 + n + begin;
    if (contents == Contents::all) {
      t.data.assign(static_cast<size_t>(end - begin), '\0');
      file.read_at(t.offset, t.data.data(), end - begin);
    }
    tensors_.emplace(name, std::move(t));
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    if (std::get<0>(spans[i]) < std::get<1>(spans[i - 1]))
      fail(ADAFUSE_ERR_FILE, where + ": tensors '" + std::get<2>(spans[i - 1]) + "' and '" + std::get<2>(spans[i]) +
                                 "' overlap (data_offsets share bytes " + std::to_string(std::get<0>(spans[i])) + ".." +
                                 std::to_string(std::get<1>(spans[i - 1])) + ")");
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
