// tests/support.hpp - helpers shared by earn's tests (not part of the library).
#pragma once

#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>

namespace earn::test {

/// Root of ../shared/data (EARN_DATA_DIR overrides), or nullopt when it is absent.
inline std::optional<std::filesystem::path> shared_data_dir() {
  std::filesystem::path p = EARN_SHARED_DATA_DIR;
  if (const char* env = std::getenv("EARN_DATA_DIR")) p = env;
  if (std::filesystem::is_directory(p)) return p;
  return std::nullopt;
}

/// A file under the shared data root, or nullopt (the caller prints why and skips).
inline std::optional<std::filesystem::path> shared_file(const std::string& rel) {
  auto root = shared_data_dir();
  if (!root) return std::nullopt;
  auto p = *root / rel;
  if (!std::filesystem::exists(p)) return std::nullopt;
  return p;
}

/// Path inside the source tree (fixtures under tests/fixtures).
inline std::filesystem::path source_path(const std::string& rel) { return std::filesystem::path(EARN_SOURCE_DIR) / rel; }

}  // namespace earn::test

/// Skip the current doctest case with a message when a shared data file is missing.
#define EARN_REQUIRE_SHARED(var, rel)                                                  \
  auto var##_opt = ::earn::test::shared_file(rel);                                     \
  if (!var##_opt) {                                                                    \
    MESSAGE("skipped: ../shared/data/" << rel << " is absent (set EARN_DATA_DIR)");   \
    return;                                                                            \
  }                                                                                    \
  const std::filesystem::path var = *var##_opt
