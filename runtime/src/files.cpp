#include "files.h"

#include <openssl/evp.h>

#include <fstream>
#include <memory>
#include <vector>

#include "error.h"

namespace adafuse {
namespace fs = std::filesystem;

void check_readable_file(const fs::path& path, const std::string& what) {
  std::error_code ec;
  const bool link = fs::is_symlink(fs::symlink_status(path, ec));
  const bool exists = fs::exists(path, ec);
  if (link && !exists) fail(ADAFUSE_ERR_FILE, path.string() + ": broken or looping symbolic link, expected a " + what);
  if (!exists) fail(ADAFUSE_ERR_FILE, path.string() + ": file not found");
  if (fs::is_directory(path, ec)) fail(ADAFUSE_ERR_FILE, path.string() + ": expected a " + what + ", found a directory");
}

std::string read_file(const fs::path& path, const std::string& what) {
  check_readable_file(path, what);
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(ADAFUSE_ERR_FILE, path.string() + ": cannot read");
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) fail(ADAFUSE_ERR_FILE, path.string() + ": cannot read");
  return data;
}

nlohmann::json read_json(const fs::path& path) {
  const std::string text = read_file(path, "JSON file");
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    // nlohmann reports a byte offset, Python a line and column: the file and the reason match.
    fail(ADAFUSE_ERR_FILE, path.string() + ": invalid JSON at byte " + std::to_string(e.byte) + ": " +
                               std::string(e.what()).substr(std::string(e.what()).find(':') + 2));
  }
}

std::string sha256_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(ADAFUSE_ERR_FILE, path.string() + ": cannot read");
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) fail(ADAFUSE_ERR_INTERNAL, "SHA-256: OpenSSL init failed");
  std::vector<char> block(1 << 20);
  while (in) {
    in.read(block.data(), static_cast<std::streamsize>(block.size()));
    if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), block.data(), static_cast<size_t>(in.gcount()));
  }
  if (in.bad()) fail(ADAFUSE_ERR_FILE, path.string() + ": cannot read");
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_DigestFinal_ex(ctx.get(), digest, &n);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < n; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

}  // namespace adafuse
