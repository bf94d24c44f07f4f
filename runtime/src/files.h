// Reading the files an engine names so that no file can hurt the runtime: the C++ twin of
// adafuse_export/inputs.py (same rules, same messages), used by every reader here (manifest,
// routing table, safetensors). Three mechanisms:
// - Confinement (`confine`): a name a manifest gives is resolved against the manifest's folder and
//   refused when it leaves it: absolute, `..`, NUL, or a symbolic link resolving outside the folder
//   (or outside the Hugging Face cache repository folder, as inputs.py allows).
// - Regular files only (`open_regular`): a FIFO, device or socket is refused from its stat before any
//   open, the open is non-blocking, and fstat checks the opened file again.
// - Bounded reads (`read_bytes`, `read_json`, `parse_json`): a size limit checked against fstat before
//   reading, a JSON nesting limit checked by an iterative SAX pass before any DOM is built.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

namespace adafuse {

inline constexpr uint64_t kMaxJsonBytes = 64ull * 1024 * 1024;  // inputs.py MAX_JSON_BYTES
inline constexpr int kMaxJsonDepth = 32;                         // inputs.py MAX_JSON_DEPTH

// A file descriptor opened read-only and non-blocking on a regular file; closed on destruction.
class RegularFile {
 public:
  RegularFile(const std::filesystem::path& path, const std::string& what);
  ~RegularFile();
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;
  uint64_t size() const { return size_; }
  // Reads exactly n bytes at offset (refused, naming the file, when the file is shorter or fails).
  void read_at(uint64_t offset, char* out, uint64_t n) const;

 private:
  std::string where_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

// Not found, a broken link, a directory, a FIFO or a device: each its own one-line message.
void check_readable_file(const std::filesystem::path& path, const std::string& what);
// The whole file, refused when it holds more than `limit` bytes.
std::string read_bytes(const std::filesystem::path& path, const std::string& what, uint64_t limit);
// JSON nested at most max_depth deep (arrays and objects); `where` names the source in messages.
nlohmann::json parse_json(const std::string& text, const std::string& where, int max_depth = kMaxJsonDepth,
                          const nlohmann::json::parser_callback_t& callback = nullptr);
nlohmann::json read_json(const std::filesystem::path& path, uint64_t limit = kMaxJsonBytes);
// Nesting depth of `text` (stops counting past max_depth + 1); -1 when it is not JSON.
int json_depth(const std::string& text, int max_depth);
// SHA-256 of a regular file's bytes as 64 lowercase hex digits.
std::string sha256_file(const std::filesystem::path& path);

// A name as a message shows it: control characters (NUL, newline) escaped as \xNN, so a message stays one line.
std::string printable(const std::string& name);

// directory / name, refused when name (as named in named_in) leaves directory (inputs.py confine).
std::filesystem::path confine(const std::filesystem::path& directory, const std::string& name, const std::string& named_in);
// Refuses a path (inside directory by name) whose symbolic links resolve outside directory.
void check_inside(const std::filesystem::path& path, const std::filesystem::path& directory);

// a * b, refused (ADAFUSE_ERR_FILE, `what`) when it does not fit 64 bits.
uint64_t checked_mul(uint64_t a, uint64_t b, const std::string& what);

}  // namespace adafuse
