// Tests of earn/io/safetensors.hpp: the writer's byte layout, exact F16/BF16 widening against hand-computed
// values, and hostile files (truncations, huge lengths, bad JSON, bad offsets, overlaps, mutations) that must
// each end in a FormatError, never a crash.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "earn/io/safetensors.hpp"

using earn::io::SafetensorsFile;

namespace {

using Bytes = std::vector<std::byte>;

// A file from a header text and raw data bytes, the length prefix written by hand (little-endian).
Bytes make_file(const std::string& header, const std::vector<std::uint8_t>& data = {}) {
  Bytes out;
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(std::byte((n >> (8 * i)) & 0xFF));
  for (char c : header) out.push_back(std::byte(static_cast<unsigned char>(c)));
  for (std::uint8_t b : data) out.push_back(std::byte(b));
  return out;
}

// Little-endian bytes of 16-bit words.
std::vector<std::uint8_t> le16(const std::vector<std::uint16_t>& words) {
  std::vector<std::uint8_t> out;
  for (std::uint16_t w : words) {
    out.push_back(static_cast<std::uint8_t>(w & 0xFF));
    out.push_back(static_cast<std::uint8_t>(w >> 8));
  }
  return out;
}

// Parses `bytes` and expects a FormatError whose message names the file and contains `what`.
void expect_format_error(const Bytes& bytes, const std::string& what) {
  try {
    (void)SafetensorsFile::from_bytes("hostile.safetensors", bytes);
    FAIL("accepted a bad file; expected an error mentioning: " << what);
  } catch (const earn::FormatError& e) {
    const std::string msg = e.what();
    CHECK_MESSAGE(msg.rfind("hostile.safetensors: ", 0) == 0, msg);
    CHECK_MESSAGE(msg.find(what) != std::string::npos, msg);
  }
}

// A valid two-tensor file: F32 "a" [2, 2] = 1..4 and F16 "b" [3] = 1, -2, 0.5.
Bytes small_valid_file() {
  const std::string h =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
      R"("b":{"dtype":"F16","shape":[3],"data_offsets":[16,22]}})";
  std::vector<std::uint8_t> data = {0, 0, 0x80, 0x3F, 0, 0, 0, 0x40, 0, 0, 0x40, 0x40, 0, 0, 0x80, 0x40};
  for (auto b : le16({0x3C00, 0xC000, 0x3800})) data.push_back(b);
  return make_file(h, data);
}

std::filesystem::path temp_path(const std::string& leaf) {
  auto dir = std::filesystem::temp_directory_path() / "earn_test_safetensors";
  std::filesystem::create_directories(dir);
  return dir / leaf;
}

}  // namespace

TEST_CASE("half and bfloat16 widen exactly, subnormals, infinities and NaN included") {
  using earn::io::half_to_float;
  CHECK(half_to_float(0x3C00) == 1.0f);
  CHECK(half_to_float(0xC000) == -2.0f);
  CHECK(half_to_float(0x3555) == 0.333251953125f);  // (1 + 341/1024) / 4
  CHECK(half_to_float(0x7BFF) == 65504.0f);         // largest finite half
  CHECK(half_to_float(0x0400) == 6.103515625e-05f);  // 2^-14, smallest normal
  CHECK(half_to_float(0x0001) == 5.9604644775390625e-08f);  // 2^-24, smallest subnormal
  CHECK(half_to_float(0x03FF) == 6.097555160522461e-05f);   // 1023 * 2^-24, largest subnormal
  CHECK(half_to_float(0x8001) == -5.9604644775390625e-08f);
  CHECK(half_to_float(0x0000) == 0.0f);
  CHECK(!std::signbit(half_to_float(0x0000)));
  CHECK(std::signbit(half_to_float(0x8000)));
  CHECK(half_to_float(0x8000) == 0.0f);
  CHECK(half_to_float(0x7C00) == std::numeric_limits<float>::infinity());
  CHECK(half_to_float(0xFC00) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(half_to_float(0x7E00)));
  CHECK(std::isnan(half_to_float(0x7C01)));  // signalling-pattern NaN stays NaN, not inf
  CHECK(std::isnan(half_to_float(0xFE00)));

  using earn::io::bf16_to_float;
  CHECK(bf16_to_float(0x3F80) == 1.0f);
  CHECK(bf16_to_float(0xC040) == -3.0f);
  CHECK(bf16_to_float(0x4049) == 3.140625f);
  CHECK(bf16_to_float(0x3EAB) == 0.333984375f);
  CHECK(bf16_to_float(0x0001) == 9.183549615799121e-41f);  // 2^-133, smallest bf16 subnormal
  CHECK(bf16_to_float(0x0080) == 1.1754943508222875e-38f);  // 2^-126, smallest normal
  CHECK(std::signbit(bf16_to_float(0x8000)));
  CHECK(bf16_to_float(0x7F80) == std::numeric_limits<float>::infinity());
  CHECK(bf16_to_float(0xFF80) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(bf16_to_float(0x7FC0)));
  CHECK(std::isnan(bf16_to_float(0x7F81)));
}

TEST_CASE("F16 and BF16 tensors read through the file convert element by element") {
  const std::string h = R"({"h":{"dtype":"F16","shape":[5],"data_offsets":[0,10]},)"
                        R"("b":{"dtype":"BF16","shape":[2,2],"data_offsets":[10,18]}})";
  std::vector<std::uint8_t> data = le16({0x3C00, 0x0001, 0xFC00, 0x3555, 0x8000});
  for (auto b : le16({0x3F80, 0xC040, 0x0001, 0x7F80})) data.push_back(b);
  const auto f = SafetensorsFile::from_bytes("mixed.safetensors", make_file(h, data));
  const earn::Vector v = f.read_vector("h", 5);
  CHECK(v[0] == 1.0f);
  CHECK(v[1] == 5.9604644775390625e-08f);
  CHECK(v[2] == -std::numeric_limits<float>::infinity());
  CHECK(v[3] == 0.333251953125f);
  CHECK(std::signbit(v[4]));
  const earn::Matrix m = f.read_matrix("b", 2, 2);
  CHECK(m(0, 0) == 1.0f);
  CHECK(m(0, 1) == -3.0f);
  CHECK(m(1, 0) == 9.183549615799121e-41f);
  CHECK(m(1, 1) == std::numeric_limits<float>::infinity());
  CHECK(f.find("h")->dtype == earn::io::Dtype::kF16);
  CHECK(f.find("b")->dtype == earn::io::Dtype::kBF16);
}

TEST_CASE("writer: byte layout matches the format, and files round-trip through the reader") {
  earn::Matrix m(3, 5);
  for (earn::Index i = 0; i < m.size(); ++i) m.data()[i] = 0.25f * float(i) - 1.0f;
  m(2, 4) = std::numeric_limits<float>::denorm_min();
  earn::Vector v(7);
  for (int i = 0; i < 7; ++i) v[i] = -float(i) / 3.0f;
  const float scalar = 42.5f;
  const std::vector<earn::io::TensorToWrite> tensors = {earn::io::tensor_to_write("w.m", m),
                                                        earn::io::tensor_to_write("v", v),
                                                        {"s", {}, {&scalar, 1}}};
  const std::map<std::string, std::string> meta = {{"earn.split_layer", "3"}, {"note", "x"}};
  const Bytes bytes = earn::io::safetensors_bytes(tensors, meta);

  // Layout read by hand: length prefix, 8-aligned JSON header, data in the given order.
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | std::uint64_t(bytes[std::size_t(i)]);
  CHECK(n % 8 == 0);
  REQUIRE(bytes.size() == 8 + n + 4 * (15 + 7 + 1));
  const auto header = nlohmann::json::parse(std::string(reinterpret_cast<const char*>(bytes.data()) + 8, n));
  CHECK(header["w.m"]["dtype"] == "F32");
  CHECK(header["w.m"]["shape"] == nlohmann::json::array({3, 5}));
  CHECK(header["w.m"]["data_offsets"] == nlohmann::json::array({0, 60}));
  CHECK(header["v"]["data_offsets"] == nlohmann::json::array({60, 88}));
  CHECK(header["s"]["shape"] == nlohmann::json::array());
  CHECK(header["s"]["data_offsets"] == nlohmann::json::array({88, 92}));
  CHECK(header["__metadata__"]["earn.split_layer"] == "3");
  // 1.0f - 1 = -1.0f is the first float: bytes 00 00 80 BF.
  CHECK(bytes[8 + n + 3] == std::byte{0xBF});
  CHECK(bytes[8 + n + 2] == std::byte{0x80});

  const auto path = temp_path("roundtrip.safetensors");
  earn::io::write_safetensors(path, tensors, meta);
  for (const auto& f : {SafetensorsFile::from_bytes("mem", bytes), SafetensorsFile::open(path)}) {
    CHECK(f.names() == std::vector<std::string>{"s", "v", "w.m"});
    CHECK(f.metadata() == meta);
    CHECK(f.read_matrix("w.m", 3, 5) == m);
    CHECK(f.read_matrix("w.m") == m);
    CHECK(f.read_vector("v", 7) == v);
    CHECK(f.read_floats(*f.find("s")) == std::vector<float>{42.5f});
    CHECK(f.find("s")->numel == 1);
    CHECK(f.find("missing") == nullptr);
  }
  std::filesystem::remove(path);
}

TEST_CASE("writer refuses inconsistent input") {
  const std::vector<float> four(4, 1.0f);
  using T = earn::io::TensorToWrite;
  CHECK_THROWS_AS(earn::io::safetensors_bytes(std::vector<T>{{"a", {2, 3}, four}}), earn::ConfigError);
  CHECK_THROWS_AS(earn::io::safetensors_bytes(std::vector<T>{{"a", {4}, four}, {"a", {4}, four}}), earn::ConfigError);
  CHECK_THROWS_AS(earn::io::safetensors_bytes(std::vector<T>{{"__metadata__", {4}, four}}), earn::ConfigError);
  CHECK_THROWS_AS(earn::io::safetensors_bytes(std::vector<T>{{"", {4}, four}}), earn::ConfigError);
  CHECK_THROWS_AS(earn::io::write_safetensors("/nonexistent-dir/x.safetensors", std::vector<T>{{"a", {4}, four}}),
                  earn::IoError);
}

TEST_CASE("reads check the expected shape and dtype and name the file and tensor") {
  const auto f = SafetensorsFile::from_bytes("hostile.safetensors", small_valid_file());
  CHECK(f.read_matrix("a", 2, 2)(1, 0) == 3.0f);
  CHECK(f.read_vector("b", 3)[2] == 0.5f);
  CHECK_THROWS_WITH_AS(f.read_matrix("a", 4, 1), "hostile.safetensors: a: shape [2, 2], expected [4, 1]",
                       earn::FormatError);
  CHECK_THROWS_WITH_AS(f.read_vector("a", 4), "hostile.safetensors: a: shape [2, 2], expected [4]", earn::FormatError);
  CHECK_THROWS_WITH_AS(f.read_matrix("b"), "hostile.safetensors: b: shape [3], expected a matrix [rows, cols]",
                       earn::FormatError);
  CHECK_THROWS_WITH_AS(f.read_vector("c", 3), "hostile.safetensors: c: tensor missing", earn::FormatError);

  const auto ints = SafetensorsFile::from_bytes(
      "ints", make_file(R"({"i":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})", {1, 0, 0, 0}));
  CHECK_THROWS_AS(ints.read_vector("i", 1), earn::FormatError);
  CHECK_THROWS_AS(SafetensorsFile::open("/nonexistent/model.safetensors"), earn::IoError);
}

TEST_CASE("hostile: every truncation of a valid file is a FormatError") {
  const Bytes full = small_valid_file();
  CHECK_NOTHROW((void)SafetensorsFile::from_bytes("ok", full));
  for (std::size_t cut = 0; cut < full.size(); ++cut) {
    CAPTURE(cut);
    CHECK_THROWS_AS((void)SafetensorsFile::from_bytes("t", Bytes(full.begin(), full.begin() + cut)),
                    earn::FormatError);
  }
  // And one byte too many: unaccounted trailing data.
  Bytes longer = full;
  longer.push_back(std::byte{0});
  expect_format_error(longer, "bytes after the last tensor");
}

TEST_CASE("hostile: header length") {
  expect_format_error(Bytes(5, std::byte{0}), "length prefix needs 8");
  Bytes huge = small_valid_file();
  for (int i = 0; i < 8; ++i) huge[std::size_t(i)] = std::byte{0xFF};  // 2^64 - 1
  expect_format_error(huge, "exceeds the limit");
  Bytes big = small_valid_file();
  big[std::size_t(4)] = std::byte{0x01};  // 2^32 + ...: within no file here
  expect_format_error(big, "exceeds the limit");
  Bytes past = make_file("{}");
  past[0] = std::byte{3};  // 3 bytes claimed, 2 present
  expect_format_error(past, "only 2 bytes follow");
}

TEST_CASE("hostile: header that is not the expected JSON") {
  expect_format_error(make_file("hello world"), "not valid JSON");
  expect_format_error(make_file("{"), "not valid JSON");
  expect_format_error(make_file(R"({"a":})"), "not valid JSON");
  expect_format_error(make_file(""), "not valid JSON");
  expect_format_error(make_file("[1,2]"), "is not a JSON object");
  expect_format_error(make_file("7"), "is not a JSON object");
  expect_format_error(make_file(std::string(100000, '[') + std::string(100000, ']')), "nested deeper");
  expect_format_error(make_file(R"({"a":[[[1]]]})"), "nested deeper");
  expect_format_error(make_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
                                R"("a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}})"),
                      "duplicate key 'a'");
  expect_format_error(make_file(R"({"a":{"dtype":"F32","dtype":"F16","shape":[0],"data_offsets":[0,0]}})"),
                      "duplicate key 'dtype'");
  expect_format_error(make_file(R"({"__metadata__":{"k":1}})"), "__metadata__.k: value is not a string");
  expect_format_error(make_file(R"({"__metadata__":[]})"), "__metadata__: is not a JSON object");
  expect_format_error(make_file(R"({"a":5})"), "a: entry is not a JSON object");
  // A header with only metadata and no data is valid; so is an empty one.
  CHECK(SafetensorsFile::from_bytes("m", make_file(R"({"__metadata__":{"k":"v"}}  )")).metadata().at("k") == "v");
  CHECK(SafetensorsFile::from_bytes("e", make_file("{}")).size() == 0);
}

TEST_CASE("hostile: entries with bad dtype, shape or offsets") {
  auto entry = [](const std::string& body, std::size_t data_bytes = 16) {
    return make_file(R"({"a":)" + body + "}", std::vector<std::uint8_t>(data_bytes, 0));
  };
  expect_format_error(entry(R"({"dtype":"F12","shape":[4],"data_offsets":[0,16]})"), "unknown dtype 'F12'");
  expect_format_error(entry(R"({"dtype":4,"shape":[4],"data_offsets":[0,16]})"), "dtype missing or not a string");
  expect_format_error(entry(R"({"shape":[4],"data_offsets":[0,16]})"), "dtype missing");
  expect_format_error(entry(R"({"dtype":"F32","data_offsets":[0,16]})"), "shape missing");
  expect_format_error(entry(R"({"dtype":"F32","shape":[-4],"data_offsets":[0,16]})"), "not a non-negative integer");
  expect_format_error(entry(R"({"dtype":"F32","shape":[2.5],"data_offsets":[0,16]})"), "not a non-negative integer");
  expect_format_error(entry(R"({"dtype":"F32","shape":["4"],"data_offsets":[0,16]})"), "not a non-negative integer");
  expect_format_error(entry(R"({"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,16]})"),
                      "not a non-negative integer");
  expect_format_error(entry(R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]})"),
                      "overflows 64 bits");
  expect_format_error(entry(R"({"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,16]})"),
                      "overflows 64 bits");
  expect_format_error(entry(R"({"dtype":"F32","shape":[4],"data_offsets":[0]})"), "not [begin, end]");
  expect_format_error(entry(R"({"dtype":"F32","shape":[4],"data_offsets":[0,16,32]})"), "not [begin, end]");
  expect_format_error(entry(R"({"dtype":"F32","shape":[4],"data_offsets":[-1,15]})"), "not a non-negative integer");
  expect_format_error(entry(R"({"dtype":"F32","shape":[4],"data_offsets":[16,0]})"), "end before begin");
  expect_format_error(entry(R"({"dtype":"F32","shape":[4],"data_offsets":[16,32]})"), "outside the data section");
  expect_format_error(entry(R"({"dtype":"F32","shape":[4],"data_offsets":[0,18446744073709551615]})"),
                      "not a non-negative integer");
  expect_format_error(entry(R"({"dtype":"F32","shape":[3],"data_offsets":[0,16]})"), "needs 12");
  expect_format_error(entry(R"({"dtype":"F16","shape":[4],"data_offsets":[0,16]})"), "needs 8");
  expect_format_error(entry(R"({"dtype":"F32","shape":[4],"data_offsets":[0,16],"extra":1})"),
                      "unknown field 'extra'");
}

TEST_CASE("hostile: tensors that overlap, leave gaps, or alias one another") {
  const std::vector<std::uint8_t> data24(24, 0), data36(36, 0);
  expect_format_error(make_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                                data24),
                      "overlap tensor 'a'");
  expect_format_error(make_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                R"("b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                                std::vector<std::uint8_t>(16, 0)),
                      "overlap tensor");
  expect_format_error(make_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                R"("b":{"dtype":"F32","shape":[4],"data_offsets":[20,36]}})",
                                data36),
                      "4 unused bytes");
  // Empty tensors sit anywhere inside the tiling without overlapping.
  CHECK_NOTHROW((void)SafetensorsFile::from_bytes(
      "ok", make_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                      R"("z":{"dtype":"F32","shape":[0,3],"data_offsets":[16,16]},)"
                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}})",
                      data24)));
}

TEST_CASE("hostile: random byte mutations never crash, they load or throw FormatError") {
  const Bytes base = small_valid_file();
  earn::Rng rng(7);
  int accepted = 0, refused = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    Bytes b = base;
    const int edits = 1 + int(rng.next_u64() % 3);
    for (int e = 0; e < edits; ++e) b[rng.next_u64() % b.size()] = std::byte(rng.next_u64() & 0xFF);
    try {
      const auto f = SafetensorsFile::from_bytes("fuzz", b);
      for (const auto& name : f.names()) {
        const auto* t = f.find(name);
        if (t->dtype == earn::io::Dtype::kF32 || t->dtype == earn::io::Dtype::kF16 ||
            t->dtype == earn::io::Dtype::kBF16)
          (void)f.read_floats(*t);
      }
      ++accepted;
    } catch (const earn::FormatError&) {
      ++refused;
    }
  }
  CHECK(accepted + refused == 3000);
  CHECK(refused > 100);  // the mutations do reach the validation, not only the data bytes
  MESSAGE("mutated files: " << accepted << " loaded, " << refused << " refused");
}
