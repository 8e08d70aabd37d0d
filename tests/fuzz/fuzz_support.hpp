// tests/fuzz/fuzz_support.hpp - what every earn fuzz harness shares: the one clean outcome of bad input.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "earn/core/error.hpp"

namespace earn::fuzz {

/// Runs `body`; an earn::Error (IoError, FormatError, ConfigError, RangeError) is the clean outcome of bad input.
/// Anything else - std::filesystem_error, std::bad_alloc, nlohmann's exceptions, std::out_of_range - escapes,
/// std::terminate aborts, and libFuzzer records the input as a crash.
template <class Body>
void clean(Body&& body) {
  try {
    body();
  } catch (const earn::Error&) {
  }
}

/// The input as bytes.
inline std::span<const std::byte> bytes(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const std::byte*>(data), size};
}

/// The input cut at NUL bytes into at most `parts` pieces (the last keeps any further NULs); missing pieces are
/// empty. Multi-file harnesses take their files this way, so a seed is the files joined by NULs.
inline std::vector<std::string_view> split_nul(const std::uint8_t* data, std::size_t size, std::size_t parts) {
  std::string_view all(reinterpret_cast<const char*>(data), size);
  std::vector<std::string_view> out;
  while (out.size() + 1 < parts) {
    const std::size_t nul = all.find('\0');
    if (nul == std::string_view::npos) break;
    out.push_back(all.substr(0, nul));
    all.remove_prefix(nul + 1);
  }
  out.push_back(all);
  out.resize(parts);
  return out;
}

}  // namespace earn::fuzz
