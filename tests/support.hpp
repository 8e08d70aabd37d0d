// tests/support.hpp - helpers shared by earn's tests (not part of the library).
#pragma once

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <system_error>

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

/// A fresh directory under the system's temp directory (named by `tag`, the process and a counter), removed with
/// everything in it when the test ends.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag = "earn_test") {
    static std::atomic<int> counter{0};
    path = std::filesystem::temp_directory_path() /
           (tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

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
