// The strict safetensors reader: a good file, and each defect refused with the file and tensor named.
#include "safetensors.h"
#include "test_util.h"

namespace adafuse::testing {
namespace {

TEST(Safetensors, ReadsTensors) {
  TempDir dir;
  const std::vector<float> values = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, 8.0f};
  write_file(dir / "t.safetensors", safetensors_bytes({{"a", "F32", {2, 3}, bytes_of(values)}, {"b", "I32", {0}, ""}}));
  SafetensorsFile f(dir / "t.safetensors");
  const SafeTensor& a = f.get("a", "F32", 2);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a.data, bytes_of(values));
  EXPECT_EQ(f.get("b", "I32", 1).numel(), 0);
}

TEST(Safetensors, RefusesEachDefect) {
  TempDir dir;
  const fs::path p = dir / "t.safetensors";
  const std::string where = p.string();
  auto refuses = [&](const std::string& bytes, const std::string& message) {
    write_file(p, bytes);
    expect_error([&] { SafetensorsFile f(p); }, ADAFUSE_ERR_FILE, message);
  };
  refuses("abc", where + ": truncated safetensors file: 3 bytes, expected at least 8");
  refuses(safetensors_with_header("{}", "").substr(0, 8) + "{", where + ": corrupt safetensors file: header length 2 is larger than the 1 bytes after it");
  refuses(safetensors_with_header("[1]", ""), where + ": corrupt safetensors header: expected a JSON object, found array");
  refuses(safetensors_with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                                  std::string(8, '\0')),
          where + ": duplicate tensor name 'a' in the safetensors header");
  refuses(safetensors_with_header(R"({"a":{"dtype":"F32","shape":[2]}})", ""),
          where + ": tensor 'a': header entry must have dtype, shape and data_offsets, found {\"dtype\":\"F32\",\"shape\":[2]}");
  refuses(safetensors_with_header(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", std::string(8, '\0')),
          where + ": tensor 'a': dtype \"Q4\" is not supported");
  refuses(safetensors_with_header(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", std::string(8, '\0')),
          where + ": tensor 'a': shape must be a list of at most 8 non-negative integers no larger than the file, found [-2]");
  refuses(safetensors_with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", std::string(8, '\0')),
          where + ": tensor 'a': data_offsets [0,16] lie outside the 8 data bytes (file truncated?)");
  refuses(safetensors_with_header(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, '\0')),
          where + ": tensor 'a': data_offsets span 8 bytes, expected 12 for F32 [3]");
  refuses(safetensors_with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,0]}})", std::string(8, '\0')),
          where + ": tensor 'a': data_offsets [4,0] lie outside the 8 data bytes (file truncated?)");
}

TEST(Safetensors, RefusesAWrongDtypeOrRankOnGet) {
  TempDir dir;
  write_file(dir / "t.safetensors", safetensors_bytes({{"a", "F16", {2}, std::string(4, '\0')}}));
  SafetensorsFile f(dir / "t.safetensors");
  expect_error([&] { f.get("a", "F32", 1); }, ADAFUSE_ERR_FILE,
               (dir / "t.safetensors").string() + ": tensor 'a' is F16 of rank 1, expected F32 of rank 1");
  expect_error([&] { f.get("b", "F32", 1); }, ADAFUSE_ERR_FILE, (dir / "t.safetensors").string() + ": tensor 'b' not found");
}

}  // namespace
}  // namespace adafuse::testing
