// earn/io/safetensors.hpp - a validating reader (and a small F32 writer) for the safetensors format.
//
// Format: an 8-byte little-endian u64 N, then N bytes of JSON
//   {"<name>": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"<key>": "<string>", ...}}
// then the data section; offsets are relative to its start, data is little-endian and row-major.
//
// Checked before any tensor is read (at least as strictly as the reference `safetensors` Rust crate):
// N within the file and at most 100 MB, JSON nested no deeper than the format needs and without duplicate keys,
// known dtypes, non-negative shapes whose element and byte counts fit 64 bits, end - begin equal to the byte
// count, and the tensors tiling the data section exactly (sorted by offset: no overlap, no gap, no trailing byte).
// Failures throw FormatError "file: field: what" naming the file and the tensor.
//
// The whole file is read into memory (no mmap: portable, and loaders convert every tensor to an fp32 copy anyway,
// so the peak is the file plus the fp32 weights, for the lifetime of the SafetensorsFile only).
//
// \code
//   auto f = earn::io::SafetensorsFile::open("model.safetensors");
//   earn::Matrix wq = f.read_matrix("model.layers.0.self_attn.q_proj.weight", 4096, 4096);
// \endcode
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"
#include "earn/io/bytes.hpp"  // read_file_bytes, checked_mul, copy_le_f32

namespace earn::io {

/// Element types the safetensors format defines.
enum class Dtype { kBool, kU8, kI8, kF8E4M3, kF8E5M2, kI16, kU16, kF16, kBF16, kI32, kU32, kF32, kI64, kU64, kF64 };

namespace detail {
struct DtypeEntry {
  std::string_view name;
  Dtype dtype;
  int size;  // bytes per element
};
inline constexpr DtypeEntry kDtypes[] = {
    {"BOOL", Dtype::kBool, 1}, {"U8", Dtype::kU8, 1},   {"I8", Dtype::kI8, 1},     {"F8_E4M3", Dtype::kF8E4M3, 1},
    {"F8_E5M2", Dtype::kF8E5M2, 1}, {"I16", Dtype::kI16, 2}, {"U16", Dtype::kU16, 2}, {"F16", Dtype::kF16, 2},
    {"BF16", Dtype::kBF16, 2}, {"I32", Dtype::kI32, 4}, {"U32", Dtype::kU32, 4}, {"F32", Dtype::kF32, 4},
    {"I64", Dtype::kI64, 8},   {"U64", Dtype::kU64, 8}, {"F64", Dtype::kF64, 8}};
}  // namespace detail

/// The dtype spelled `name` in a header ("F32", "BF16", ...), or nullopt.
inline std::optional<Dtype> parse_dtype(std::string_view name) {
  for (const auto& e : detail::kDtypes)
    if (e.name == name) return e.dtype;
  return std::nullopt;
}
/// The header spelling of `d`.
inline std::string_view dtype_name(Dtype d) {
  for (const auto& e : detail::kDtypes)
    if (e.dtype == d) return e.name;
  return "?";
}
/// Bytes per element of `d`.
inline int dtype_size(Dtype d) {
  for (const auto& e : detail::kDtypes)
    if (e.dtype == d) return e.size;
  return 0;
}

/// IEEE binary16 bits -> float, exactly (every half is a float): subnormals, infinities and NaN payloads kept.
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24, exact in float (at most 10 significant bits).
    const float mag = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -mag : mag;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7F800000u | (mant << 13));  // inf, or NaN keeping its payload
  return std::bit_cast<float>(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

/// bfloat16 bits -> float, exactly: bfloat16 is the upper half of a float.
inline float bf16_to_float(std::uint16_t b) { return std::bit_cast<float>(std::uint32_t(b) << 16); }

/// One tensor's header entry; offsets are absolute positions in the file's bytes.
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::kF32;
  std::vector<std::int64_t> shape;
  std::int64_t numel = 0;  ///< product of shape (1 for a scalar [])
  std::int64_t begin = 0;  ///< first byte in the file
  std::int64_t end = 0;    ///< one past the last byte
};

/// A parsed, validated safetensors file held in memory.
class SafetensorsFile {
 public:
  /// Largest header accepted: far above any real model's (a few MB), small enough to parse safely.
  static constexpr std::uint64_t kMaxHeaderBytes = 100u << 20;

  /// Reads and validates `path`; IoError when it cannot be read, FormatError when malformed.
  static SafetensorsFile open(const std::filesystem::path& path) {
    return from_bytes(path.string(), detail::read_file_bytes(path));
  }

  /// Validates `bytes`; `name` (usually the file name) prefixes every error message.
  static SafetensorsFile from_bytes(std::string name, std::vector<std::byte> bytes) {
    SafetensorsFile f;
    f.name_ = std::move(name);
    f.bytes_ = std::move(bytes);
    f.parse();
    return f;
  }

  const std::string& name() const { return name_; }
  /// The entry named `tensor`, or nullptr.
  const TensorInfo* find(std::string_view tensor) const {
    auto it = tensors_.find(tensor);
    return it == tensors_.end() ? nullptr : &it->second;
  }
  /// Every tensor name, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& [n, info] : tensors_) out.push_back(n);
    return out;
  }
  std::size_t size() const { return tensors_.size(); }
  /// The "__metadata__" map (empty when absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// Elements of a F32 / F16 / BF16 tensor converted to float, row-major.
  std::vector<float> read_floats(const TensorInfo& t) const {
    std::vector<float> out(static_cast<std::size_t>(t.numel));
    convert(t, out.data());
    return out;
  }

  /// Elements of a F64 tensor, or of a F32 / F16 / BF16 one widened (exactly), as double, row-major (fixtures of
  /// float64 references, optimizer state).
  std::vector<double> read_doubles(const TensorInfo& t) const {
    std::vector<double> out(static_cast<std::size_t>(t.numel));
    if (t.dtype == Dtype::kF64) {
      const std::byte* src = bytes_.data() + t.begin;
      for (std::int64_t i = 0; i < t.numel; ++i) {
        std::uint64_t b = 0;
        for (int j = 7; j >= 0; --j) b = b << 8 | std::uint64_t(src[8 * i + j]);
        out[static_cast<std::size_t>(i)] = std::bit_cast<double>(b);
      }
      return out;
    }
    const std::vector<float> f = read_floats(t);
    std::copy(f.begin(), f.end(), out.begin());
    return out;
  }

  /// Tensor `tensor` of shape exactly [rows, cols]; FormatError naming file and tensor otherwise.
  Matrix read_matrix(std::string_view tensor, Index rows, Index cols) const {
    const TensorInfo& t = require(tensor, {rows, cols});
    Matrix m(rows, cols);
    convert(t, m.data());
    return m;
  }
  /// Tensor `tensor` of any 2-D shape [rows, cols].
  Matrix read_matrix(std::string_view tensor) const {
    const TensorInfo& t = require(tensor);
    if (t.shape.size() != 2) fail(t.name, "shape " + shape_string(t.shape) + ", expected a matrix [rows, cols]");
    return read_matrix(tensor, t.shape[0], t.shape[1]);
  }
  /// Tensor `tensor` of shape exactly [n].
  Vector read_vector(std::string_view tensor, Index n) const {
    const TensorInfo& t = require(tensor, {n});
    Vector v(n);
    convert(t, v.data());
    return v;
  }

  /// "[a, b, c]".
  static std::string shape_string(std::span<const std::int64_t> shape) {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }

 private:
  using json = nlohmann::json;

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    earn::detail::throw_format(name_, field, what);
  }

  const TensorInfo& require(std::string_view tensor) const {
    const TensorInfo* t = find(tensor);
    if (!t) fail(std::string(tensor), "tensor missing");
    return *t;
  }
  const TensorInfo& require(std::string_view tensor, std::initializer_list<Index> shape) const {
    const TensorInfo& t = require(tensor);
    if (!std::equal(t.shape.begin(), t.shape.end(), shape.begin(), shape.end()))
      fail(t.name, "shape " + shape_string(t.shape) + ", expected " +
                       shape_string(std::vector<std::int64_t>(shape.begin(), shape.end())));
    return t;
  }

  void convert(const TensorInfo& t, float* dst) const {
    const std::byte* src = bytes_.data() + t.begin;
    switch (t.dtype) {
      case Dtype::kF32:
        detail::copy_le_f32(dst, src, t.numel);
        return;
      case Dtype::kF16:
        for (std::int64_t i = 0; i < t.numel; ++i) dst[i] = half_to_float(load_le_u16(src + 2 * i));
        return;
      case Dtype::kBF16:
        for (std::int64_t i = 0; i < t.numel; ++i) dst[i] = bf16_to_float(load_le_u16(src + 2 * i));
        return;
      default:
        fail(t.name, "dtype " + std::string(dtype_name(t.dtype)) + " cannot be read as float (F32, F16, BF16 can)");
    }
  }

  static std::uint16_t load_le_u16(const std::byte* p) {
    return static_cast<std::uint16_t>(std::uint16_t(p[0]) | std::uint16_t(p[1]) << 8);
  }

  void parse() {
    const std::uint64_t size = bytes_.size();
    if (size < 8) fail("header length", "file has " + std::to_string(size) + " bytes, the length prefix needs 8");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = n << 8 | std::uint64_t(bytes_[static_cast<std::size_t>(i)]);
    if (n > kMaxHeaderBytes)
      fail("header length", std::to_string(n) + " bytes exceeds the limit of " + std::to_string(kMaxHeaderBytes));
    if (n > size - 8)
      fail("header length", std::to_string(n) + " bytes, but only " + std::to_string(size - 8) +
                                " bytes follow the length prefix");
    const auto* first = reinterpret_cast<const char*>(bytes_.data()) + 8;
    const json header = parse_json(first, first + n);
    if (!header.is_object()) fail("header", "is not a JSON object");
    const std::int64_t data_begin = 8 + static_cast<std::int64_t>(n);
    const std::int64_t data_len = static_cast<std::int64_t>(size) - data_begin;

    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__") {
        if (!value.is_object()) fail("__metadata__", "is not a JSON object");
        for (const auto& [mk, mv] : value.items()) {
          if (!mv.is_string()) fail("__metadata__." + mk, "value is not a string");
          metadata_.emplace(mk, mv.get<std::string>());
        }
        continue;
      }
      TensorInfo t = parse_entry(key, value, data_len);
      t.begin += data_begin;
      t.end += data_begin;
      tensors_.emplace(key, std::move(t));
    }

    // The tensors must tile the data section, as the reference reader demands: sorted by offset, each starts
    // where the previous ended, the last ends at the file's end. This rules out overlap (two names aliasing one
    // buffer) and unaccounted bytes.
    std::vector<const TensorInfo*> order;
    for (const auto& [k, t] : tensors_) order.push_back(&t);
    std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    std::int64_t at = data_begin;
    const TensorInfo* prev = nullptr;
    for (const TensorInfo* t : order) {
      if (t->begin < at)
        fail(t->name, "data_offsets [" + std::to_string(t->begin - data_begin) + ", " +
                          std::to_string(t->end - data_begin) + ") overlap tensor '" + prev->name + "'");
      if (t->begin > at)
        fail(t->name, "data_offsets start at " + std::to_string(t->begin - data_begin) + ", leaving " +
                          std::to_string(t->begin - at) + " unused bytes before it");
      at = t->end;
      prev = t;
    }
    if (at != static_cast<std::int64_t>(size))
      fail("data", std::to_string(static_cast<std::int64_t>(size) - at) + " bytes after the last tensor");
  }

  // Parses the header with nesting capped at the format's depth (objects of arrays) and duplicate keys refused:
  // a deep or repetitive hostile header fails fast instead of building a huge tree or silently shadowing entries.
  json parse_json(const char* first, const char* last) const {
    std::vector<std::set<std::string>> keys(4);
    auto guard = [&](int depth, json::parse_event_t ev, json& parsed) {
      if ((ev == json::parse_event_t::object_start || ev == json::parse_event_t::array_start)) {
        if (depth >= 3) fail("header", "JSON nested deeper than the format allows");
        keys[static_cast<std::size_t>(depth) + 1].clear();
      } else if (ev == json::parse_event_t::key) {
        if (!keys[static_cast<std::size_t>(depth)].insert(parsed.get<std::string>()).second)
          fail("header", "duplicate key '" + parsed.get<std::string>() + "'");
      }
      return true;
    };
    try {
      return json::parse(first, last, guard);
    } catch (const json::exception& e) {
      fail("header", std::string("not valid JSON: ") + e.what());
    }
  }

  TensorInfo parse_entry(const std::string& key, const json& v, std::int64_t data_len) const {
    if (!v.is_object()) fail(key, "entry is not a JSON object");
    for (const auto& [k, x] : v.items())
      if (k != "dtype" && k != "shape" && k != "data_offsets") fail(key, "unknown field '" + k + "'");
    TensorInfo t;
    t.name = key;
    const auto dt = v.find("dtype");
    if (dt == v.end() || !dt->is_string()) fail(key, "dtype missing or not a string");
    const auto d = parse_dtype(dt->get<std::string>());
    if (!d) fail(key, "unknown dtype '" + dt->get<std::string>() + "'");
    t.dtype = *d;

    auto non_negative = [&](const json& x, const char* field) -> std::int64_t {
      // JSON integers only: 2.0 or -1 are not sizes; uint64 beyond int64 is refused.
      if (x.is_number_unsigned() && x.get<std::uint64_t>() <= std::uint64_t(std::numeric_limits<std::int64_t>::max()))
        return static_cast<std::int64_t>(x.get<std::uint64_t>());
      if (x.is_number_integer() && x.get<std::int64_t>() >= 0) return x.get<std::int64_t>();
      fail(key, std::string(field) + " holds " + x.dump() + ", not a non-negative integer");
    };
    const auto sh = v.find("shape");
    if (sh == v.end() || !sh->is_array()) fail(key, "shape missing or not an array");
    t.numel = 1;
    for (const json& x : *sh) {
      t.shape.push_back(non_negative(x, "shape"));
      t.numel = detail::checked_mul(t.numel, t.shape.back(), name_, key + ": shape");
    }
    const std::int64_t nbytes = detail::checked_mul(t.numel, dtype_size(t.dtype), name_, key + ": shape");

    const auto off = v.find("data_offsets");
    if (off == v.end() || !off->is_array() || off->size() != 2) fail(key, "data_offsets missing or not [begin, end]");
    t.begin = non_negative((*off)[0], "data_offsets");
    t.end = non_negative((*off)[1], "data_offsets");
    const std::string range = "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + ")";
    if (t.end < t.begin) fail(key, range + " end before begin");
    if (t.end > data_len) fail(key, range + " outside the data section of " + std::to_string(data_len) + " bytes");
    if (t.end - t.begin != nbytes)
      fail(key, range + " hold " + std::to_string(t.end - t.begin) + " bytes, but " +
                    std::string(dtype_name(t.dtype)) + " " + shape_string(t.shape) + " needs " +
                    std::to_string(nbytes));
    return t;
  }

  SafetensorsFile() = default;

  std::string name_;
  std::vector<std::byte> bytes_;
  std::map<std::string, TensorInfo, std::less<>> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// A float tensor to write: a view of row-major data the caller keeps alive.
struct TensorToWrite {
  std::string name;
  std::vector<std::int64_t> shape;
  std::span<const float> data;
};

/// [rows, cols] view of a matrix.
inline TensorToWrite tensor_to_write(std::string name, const Matrix& m) {
  return {std::move(name), {m.rows(), m.cols()}, {m.data(), static_cast<std::size_t>(m.size())}};
}
/// [n] view of a vector.
inline TensorToWrite tensor_to_write(std::string name, const Vector& v) {
  return {std::move(name), {v.size()}, {v.data(), static_cast<std::size_t>(v.size())}};
}

/// The bytes of a safetensors file holding `tensors` as F32 (in the given order) and `metadata`.
/// ConfigError for an empty or duplicate name, "__metadata__" as a name, or data that disagrees with its shape.
inline std::vector<std::byte> safetensors_bytes(std::span<const TensorToWrite> tensors,
                                                const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::int64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__" || header.contains(t.name))
      throw ConfigError("safetensors writer: tensor name '" + t.name + "' is empty, reserved or repeated");
    std::int64_t n = 1;
    for (std::int64_t d : t.shape) n = d < 0 ? -1 : n * d;
    if (n != static_cast<std::int64_t>(t.data.size()))
      throw ConfigError("safetensors writer: " + t.name + ": shape " + SafetensorsFile::shape_string(t.shape) +
                        " does not match " + std::to_string(t.data.size()) + " floats");
    const std::int64_t bytes = n * 4;
    header[t.name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // pad so the data section starts 8-byte aligned, as HF's writer does
  std::vector<std::byte> out(8 + text.size() + static_cast<std::size_t>(offset));
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = std::byte((std::uint64_t(text.size()) >> (8 * i)) & 0xFF);
  std::memcpy(out.data() + 8, text.data(), text.size());
  std::byte* dst = out.data() + 8 + text.size();
  for (const TensorToWrite& t : tensors) {
    for (float f : t.data) {
      const auto u = std::bit_cast<std::uint32_t>(f);  // little-endian whatever the host
      for (int i = 0; i < 4; ++i) *dst++ = std::byte((u >> (8 * i)) & 0xFF);
    }
  }
  return out;
}

/// Writes `tensors` as F32 and `metadata` to `path`; IoError when the file cannot be written.
inline void write_safetensors(const std::filesystem::path& path, std::span<const TensorToWrite> tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  const std::vector<std::byte> bytes = safetensors_bytes(tensors, metadata);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw IoError(path.string() + ": cannot open for writing");
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw IoError(path.string() + ": write failed");
}

}  // namespace earn::io
