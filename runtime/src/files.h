// File access with the Python side's messages (adafuse_export/tensors.py check_readable_file, read_json).
#pragma once

#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

namespace adafuse {

// Not found, a broken link, or a directory: each its own one-line message.
void check_readable_file(const std::filesystem::path& path, const std::string& what);
std::string read_file(const std::filesystem::path& path, const std::string& what);
nlohmann::json read_json(const std::filesystem::path& path);
// SHA-256 of a file's bytes as 64 lowercase hex digits.
std::string sha256_file(const std::filesystem::path& path);

}  // namespace adafuse
