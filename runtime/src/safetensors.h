// A strict safetensors reader: 8-byte little-endian header length, JSON header, data.
// Every defect (truncation, offsets outside the data, wrong sizes, duplicate names, unknown dtypes)
// is refused with a one-line message naming the file and tensor, as adafuse_export/tensors.py does.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace adafuse {

struct SafeTensor {
  std::string dtype;  // safetensors code: F32, I32, ...
  std::vector<int64_t> shape;
  std::string data;   // raw little-endian bytes (empty when the file was opened for its header only)
  uint64_t offset = 0;  // where those bytes start in the file

  int64_t numel() const;
  size_t bytes() const;  // numel times the dtype's size (a checked file has only known dtypes)
};

class SafetensorsFile {
 public:
  // Contents::header_only checks the header alone (every rule above) and reads no tensor bytes: a
  // multi-GB weights file is checked in the time of its header; `offset` says where each tensor lies.
  enum class Contents { all, header_only };
  explicit SafetensorsFile(const std::filesystem::path& path, Contents contents = Contents::all);
  const std::filesystem::path& path() const { return path_; }
  // The tensor, checked to have this dtype and rank; refused with the file and name otherwise.
  const SafeTensor& get(const std::string& name, const std::string& dtype, size_t rank) const;
  const std::map<std::string, SafeTensor>& tensors() const { return tensors_; }

 private:
  std::filesystem::path path_;
  std::map<std::string, SafeTensor> tensors_;
};

}  // namespace adafuse
