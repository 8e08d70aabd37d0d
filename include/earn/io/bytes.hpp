// earn/io/bytes.hpp - bounds-checked byte access shared by every loader (llama2.c, tokenizer, safetensors).
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <span>
#include <string>
#include <system_error>
#include <type_traits>
#include <vector>

#include "earn/core/error.hpp"

namespace earn::io {

namespace detail {

/// Whether `p` exists, never throwing: a path the system refuses to look up (a name past the file-name limit, a
/// directory without search permission) counts as absent, and the read that follows names the reason.
inline bool exists_nothrow(const std::filesystem::path& p) {
  std::error_code ec;
  return std::filesystem::exists(p, ec);
}

/// IoError unless `file` is a regular file (or a link to one), saying why: absent, a directory, a name the system
/// refuses. The non-throwing std::filesystem overloads, so no std::filesystem_error escapes a loader.
inline void require_regular_file(const std::filesystem::path& file) {
  std::error_code ec;
  const auto st = std::filesystem::status(file, ec);
  if (std::filesystem::is_regular_file(st)) return;
  if (std::filesystem::is_directory(st)) throw IoError(file.string() + ": is a directory, expected a file");
  if (std::filesystem::exists(st)) throw IoError(file.string() + ": is not a regular file");
  throw IoError(file.string() + ": cannot open: " + (ec ? ec.message() : std::string("no such file")));
}

/// The whole regular file in a byte container (std::vector<std::byte> or std::string); IoError when it is not a
/// regular file or cannot be opened or read.
template <class Bytes>
Bytes read_file_as(const std::filesystem::path& file) {
  require_regular_file(file);
  std::ifstream in(file, std::ios::binary);
  if (!in) throw IoError(file.string() + ": cannot open");
  std::error_code ec;
  const auto size = std::filesystem::file_size(file, ec);
  if (ec) throw IoError(file.string() + ": cannot stat: " + ec.message());
  if (size > static_cast<std::uintmax_t>(std::numeric_limits<std::streamsize>::max()))
    throw IoError(file.string() + ": too large to read");
  Bytes bytes(static_cast<std::size_t>(size), typename Bytes::value_type{});
  if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size)))
    throw IoError(file.string() + ": read failed after " + std::to_string(in.gcount()) + " bytes");
  return bytes;
}

/// The whole file in memory; IoError when it cannot be opened or read.
inline std::vector<std::byte> read_file_bytes(const std::filesystem::path& file) {
  return read_file_as<std::vector<std::byte>>(file);
}

/// The whole file as text (no newline translation); IoError when it cannot be opened or read.
inline std::string read_file_text(const std::filesystem::path& file) { return read_file_as<std::string>(file); }

/// a * b for non-negative sizes, or FormatError naming `field` when the product leaves int64.
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, const std::string& file, const std::string& field) {
  if (a < 0 || b < 0 || (a != 0 && b > std::numeric_limits<std::int64_t>::max() / a))
    earn::detail::throw_format(file, field, "size overflows 64 bits");
  return a * b;
}

/// a + b for non-negative sizes, or FormatError naming `field` on overflow.
inline std::int64_t checked_add(std::int64_t a, std::int64_t b, const std::string& file, const std::string& field) {
  if (a < 0 || b < 0 || b > std::numeric_limits<std::int64_t>::max() - a)
    earn::detail::throw_format(file, field, "size overflows 64 bits");
  return a + b;
}

/// Little-endian unsigned 32-bit value at `p` (byte order fixed by the format, not by the host).
inline std::uint32_t load_le_u32(const std::byte* p) {
  return std::uint32_t(p[0]) | std::uint32_t(p[1]) << 8 | std::uint32_t(p[2]) << 16 | std::uint32_t(p[3]) << 24;
}

/// `n` little-endian fp32 values from `src` into `dst`; a plain copy on little-endian hosts.
inline void copy_le_f32(float* dst, const std::byte* src, std::int64_t n) {
  if constexpr (std::endian::native == std::endian::little) {
    if (n > 0) std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float));
  } else {
    for (std::int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(load_le_u32(src + 4 * i));
  }
}

/// Bounds-checked little-endian cursor over a byte span. Every read names its field, and reading past the end
/// throws FormatError "name: field: file ends at byte X, needs N bytes from byte Y".
class ByteReader {
 public:
  ByteReader(std::span<const std::byte> bytes, std::string name) : bytes_(bytes), name_(std::move(name)) {}

  const std::string& name() const { return name_; }
  std::int64_t offset() const { return offset_; }
  std::int64_t size() const { return static_cast<std::int64_t>(bytes_.size()); }
  std::int64_t remaining() const { return size() - offset_; }

  /// The next `n` bytes. `field` is a string or a callable returning one (built only when the read fails).
  template <class Field>
  std::span<const std::byte> take(std::int64_t n, const Field& field) {
    if (n < 0 || n > remaining())  // n <= remaining keeps offset_ + n inside int64
      earn::detail::throw_format(name_, field_name(field),
                                 "file ends at byte " + std::to_string(size()) + ", needs " + std::to_string(n) +
                                     " bytes from byte " + std::to_string(offset_));
    auto s = bytes_.subspan(static_cast<std::size_t>(offset_), static_cast<std::size_t>(n));
    offset_ += n;
    return s;
  }

  template <class Field>
  std::int32_t i32(const Field& field) {
    return static_cast<std::int32_t>(load_le_u32(take(4, field).data()));
  }
  template <class Field>
  float f32(const Field& field) {
    return std::bit_cast<float>(load_le_u32(take(4, field).data()));
  }

  template <class Field>
  static std::string field_name(const Field& field) {
    if constexpr (std::is_invocable_v<const Field&>)
      return std::string(field());
    else
      return std::string(field);
  }

 private:
  std::span<const std::byte> bytes_;
  std::string name_;
  std::int64_t offset_ = 0;
};

}  // namespace detail

}  // namespace earn::io
