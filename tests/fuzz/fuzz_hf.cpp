// Fuzzes load_hf (earn/io/hf.hpp) on config.json and the sharded index: the input is config.json NUL
// model.safetensors.index.json, written into a scratch directory beside the four real shards of
// tests/fixtures/hf/qwen2_sharded (linked, never copied), and the directory is loaded. Shard names in the index
// are the file system's to judge: a name past the file-name limit must be an earn error too. An accepted model
// must have finite numerics.
// Seeds: the fixtures' config.json files, each with the sharded index (tests/fuzz/make_corpus.cpp).
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "earn/io/hf.hpp"
#include "fuzz_support.hpp"

namespace {

namespace fs = std::filesystem;

// The scratch directory of this process, made once, removed at exit.
const fs::path& scratch() {
  static const fs::path dir = [] {
    const fs::path d = fs::temp_directory_path() / ("earn_fuzz_hf_" + std::to_string(::getpid()));
    fs::create_directories(d);
    const fs::path shards = fs::path(EARN_SOURCE_DIR) / "tests/fixtures/hf/qwen2_sharded";
    for (const auto& e : fs::directory_iterator(shards))
      if (e.path().extension() == ".safetensors") fs::create_symlink(e.path(), d / e.path().filename());
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(scratch(), ec);
    });
    return d;
  }();
  return dir;
}

void write(const fs::path& p, std::string_view text) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto part = earn::fuzz::split_nul(data, size, 2);
  write(scratch() / "config.json", part[0]);
  write(scratch() / "model.safetensors.index.json", part[1]);
  earn::fuzz::clean([&] {
    const earn::ModelWeights w = earn::io::load_hf(scratch());
    // An accepted config is one the model can run with: numerics finite as the floats it keeps (1e39 in the JSON
    // became +inf and was accepted).
    if (!std::isfinite(w.config.norm_eps) || !std::isfinite(w.config.rope_theta)) {
      std::fprintf(stderr, "fuzz_hf: accepted a non-finite rms_norm_eps or rope_theta\n");
      std::abort();
    }
  });
  return 0;
}
