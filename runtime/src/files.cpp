#include "files.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "error.h"

namespace adafuse {
namespace fs = std::filesystem;

namespace {

// inputs.py _kind: what a non-regular file is, for "expected a ..., found a ...".
std::string kind_of(mode_t mode) {
  if (S_ISDIR(mode)) return "directory";
  if (S_ISFIFO(mode)) return "FIFO (named pipe)";
  if (S_ISCHR(mode)) return "character device";
  if (S_ISBLK(mode)) return "block device";
  if (S_ISSOCK(mode)) return "socket";
  return "special file";
}

std::string os_error(int err) { return std::strerror(err); }

// Python's str(Path): "." for an empty path.
std::string shown(const fs::path& p) { return p.empty() ? std::string(".") : p.string(); }

// Iterative depth count (nlohmann's SAX parser keeps its own stack, so nothing here recurses).
class DepthSax : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit DepthSax(int max_depth) : max_(max_depth) {}
  int deepest = 0;
  bool too_deep = false;

  bool null() override { return leaf(); }
  bool boolean(bool) override { return leaf(); }
  bool number_integer(number_integer_t) override { return leaf(); }
  bool number_unsigned(number_unsigned_t) override { return leaf(); }
  bool number_float(number_float_t, const string_t&) override { return leaf(); }
  bool string(string_t&) override { return leaf(); }
  bool binary(binary_t&) override { return leaf(); }
  bool start_object(std::size_t) override { return open(); }
  bool key(string_t&) override { return true; }
  bool end_object() override { return close(); }
  bool start_array(std::size_t) override { return open(); }
  bool end_array() override { return close(); }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }

 private:
  // inputs.py _depth counts a value one deeper than its container, containers and scalars alike.
  bool reach(int d) {
    if (d > deepest) deepest = d;
    if (d > max_) too_deep = true;
    return !too_deep;
  }
  bool leaf() { return reach(depth_ + 1); }
  bool open() { return reach(++depth_); }
  bool close() {
    --depth_;
    return true;
  }
  int max_;
  int depth_ = 0;
};

}  // namespace

RegularFile::RegularFile(const fs::path& path, const std::string& what) : where_(path.string()) {
  check_readable_file(path, what);
  fd_ = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd_ < 0) fail(ADAFUSE_ERR_FILE, where_ + ": cannot read: " + os_error(errno));
  struct stat st {};
  if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
    const std::string kind = kind_of(st.st_mode);
    ::close(fd_);
    fd_ = -1;
    fail(ADAFUSE_ERR_FILE, where_ + ": expected a " + what + ", found a " + kind);
  }
  size_ = static_cast<uint64_t>(st.st_size);
}

RegularFile::~RegularFile() {
  if (fd_ >= 0) ::close(fd_);
}

void RegularFile::read_at(uint64_t offset, char* out, uint64_t n) const {
  uint64_t end = 0;
  if (__builtin_add_overflow(offset, n, &end) || end > size_)
    fail(ADAFUSE_ERR_FILE, where_ + ": cannot read " + std::to_string(n) + " bytes at offset " + std::to_string(offset) +
                               ": the file has " + std::to_string(size_));
  while (n > 0) {
    const size_t chunk = static_cast<size_t>(n < (1ull << 30) ? n : (1ull << 30));
    const ssize_t got = ::pread(fd_, out, chunk, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) fail(ADAFUSE_ERR_FILE, where_ + ": cannot read: " + os_error(errno));
    if (got == 0) fail(ADAFUSE_ERR_FILE, where_ + ": file shrank while being read");
    out += got;
    offset += static_cast<uint64_t>(got);
    n -= static_cast<uint64_t>(got);
  }
}

void check_readable_file(const fs::path& path, const std::string& what) {
  const std::string p = path.string();
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    struct stat lst {};
    const bool is_link = ::lstat(path.c_str(), &lst) == 0 && S_ISLNK(lst.st_mode);
    if (err == ENOENT && !is_link) fail(ADAFUSE_ERR_FILE, p + ": file not found");
    if (err == ENOENT || is_link) fail(ADAFUSE_ERR_FILE, p + ": broken or looping symbolic link, expected a " + what);
    fail(ADAFUSE_ERR_FILE, p + ": cannot read: " + os_error(err));
  }
  if (!S_ISREG(st.st_mode)) fail(ADAFUSE_ERR_FILE, p + ": expected a " + what + ", found a " + kind_of(st.st_mode));
}

std::string read_bytes(const fs::path& path, const std::string& what, uint64_t limit) {
  RegularFile file(path, what);
  if (file.size() > limit)
    fail(ADAFUSE_ERR_FILE, path.string() + ": " + std::to_string(file.size()) + " bytes, more than the " +
                               std::to_string(limit) + " a " + what + " may have");
  std::string data(static_cast<size_t>(file.size()), '\0');
  file.read_at(0, data.data(), file.size());
  return data;
}

int json_depth(const std::string& text, int max_depth) {
  DepthSax sax(max_depth);
  const bool ok = nlohmann::json::sax_parse(text, &sax, nlohmann::json::input_format_t::json, false);
  if (sax.too_deep) return sax.deepest;
  return ok ? sax.deepest : -1;
}

nlohmann::json parse_json(const std::string& text, const std::string& where, int max_depth,
                          const nlohmann::json::parser_callback_t& callback) {
  // The depth pass first: nlohmann's DOM is never built for a deeper document.
  if (json_depth(text, max_depth) > max_depth)
    fail(ADAFUSE_ERR_FILE, where + ": JSON nested deeper than " + std::to_string(max_depth) + " levels");
  try {
    return nlohmann::json::parse(text, callback);
  } catch (const nlohmann::json::parse_error& e) {
    // nlohmann reports a byte offset, Python a line and column: the file and the reason match.
    const std::string what = e.what();
    const size_t colon = what.find(": ");
    fail(ADAFUSE_ERR_FILE, where + ": invalid JSON at byte " + std::to_string(e.byte) + ": " +
                               (colon == std::string::npos ? what : what.substr(colon + 2)));
  } catch (const nlohmann::json::exception& e) {  // out_of_range: a number beyond double's range
    fail(ADAFUSE_ERR_FILE, where + ": invalid JSON: " + e.what());
  }
}

nlohmann::json read_json(const fs::path& path, uint64_t limit) {
  return parse_json(read_bytes(path, "JSON file", limit), path.string());
}

std::string sha256_file(const fs::path& path) {
  RegularFile file(path, "file");
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) fail(ADAFUSE_ERR_INTERNAL, "SHA-256: OpenSSL init failed");
  std::vector<char> block(1 << 20);
  // Exactly the size fstat gave: a file that grows while hashed is not read past it.
  for (uint64_t at = 0; at < file.size();) {
    const uint64_t n = file.size() - at < block.size() ? file.size() - at : block.size();
    file.read_at(at, block.data(), n);
    EVP_DigestUpdate(ctx.get(), block.data(), static_cast<size_t>(n));
    at += n;
  }
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

namespace {

// os.path.realpath (non-strict): links resolved as far as the path exists.
fs::path real_path(const fs::path& p) {
  std::error_code ec;
  fs::path r = fs::weakly_canonical(fs::absolute(p, ec), ec);
  if (ec) r = fs::absolute(p, ec).lexically_normal();
  return r;
}

bool is_within(const fs::path& p, const fs::path& root) {
  auto a = p.begin(), b = root.begin();
  for (; b != root.end(); ++a, ++b) {
    if (b->empty() && std::next(b) == root.end()) break;  // root with a trailing separator
    if (a == p.end() || *a != *b) return false;
  }
  return true;
}

// inputs.py hf_cache_repo: `.../models--org--name` when directory is `.../models--org--name/snapshots/<rev>`.
std::optional<fs::path> hf_cache_repo(const fs::path& directory) {
  const fs::path real = real_path(directory);
  const std::string repo = real.parent_path().parent_path().filename().string();
  if (real.parent_path().filename() == "snapshots" && (repo.rfind("models--", 0) == 0 || repo.rfind("datasets--", 0) == 0))
    return real.parent_path().parent_path();
  return std::nullopt;
}

}  // namespace

void check_inside(const fs::path& path, const fs::path& directory) {
  const fs::path real = real_path(path);
  if (is_within(real, real_path(directory))) return;
  const auto repo = hf_cache_repo(directory);
  if (repo && is_within(real, *repo)) return;
  fail(ADAFUSE_ERR_FILE, path.string() + ": symbolic link to " + real.string() + ", outside " + shown(directory) +
                             "; only links to files inside the checkpoint (or its Hugging Face cache folder) are followed");
}

// A name as a message shows it: control characters (NUL, newline) escaped, so the message stays one line.
std::string printable(const std::string& name) {
  std::string out;
  for (unsigned char c : name) {
    if (c < 0x20 || c == 0x7f) {
      static const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

fs::path confine(const fs::path& directory, const std::string& name, const std::string& named_in) {
  if (name.empty()) fail(ADAFUSE_ERR_FILE, named_in + ": expected a file name, found ''");
  bool outside = name[0] == '/' || name.find('\0') != std::string::npos;
  fs::path path = directory;
  size_t start = 0;
  while (!outside && start <= name.size()) {
    const size_t slash = std::min(name.find('/', start), name.size());
    const std::string part = name.substr(start, slash - start);
    if (part == "..") outside = true;
    else if (!part.empty() && part != ".") path /= part;
    start = slash + 1;
  }
  if (outside)
    fail(ADAFUSE_ERR_FILE, named_in + ": names '" + printable(name) + "', a path outside " + shown(directory) +
                               "; only files inside it may be named");
  check_inside(path, directory);
  return path;
}

uint64_t checked_mul(uint64_t a, uint64_t b, const std::string& what) {
  uint64_t out = 0;
  if (__builtin_mul_overflow(a, b, &out)) fail(ADAFUSE_ERR_FILE, what + " overflows 64 bits");
  return out;
}

}  // namespace adafuse
