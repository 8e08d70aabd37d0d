// examples/model_source.hpp - where an example's model comes from: a checkpoint path, or a built-in random model.
#pragma once

#include <CLI/CLI.hpp>

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <system_error>

#include "earn/core/error.hpp"
#include "earn/io/hf.hpp"
#include "earn/io/llama2c.hpp"
#include "earn/model/weights.hpp"

namespace earn::examples {

/// A random Llama sized for a 2-core CPU: d 512, 8 layers, FFN 1408, vocab 8192 (about 30M parameters).
inline ModelConfig cpu_sized_llama() {
  ModelConfig c;
  c.dim = 512;
  c.hidden_dim = 1408;
  c.n_layers = 8;
  c.n_heads = 8;
  c.n_kv_heads = 8;
  c.vocab_size = 8192;
  c.max_seq_len = 4096;
  return c;
}

/// A random ~110M-parameter Llama (stories110M's shape: d 768, 12 layers, FFN 2048, vocab 32000).
inline ModelConfig llama_110m() {
  ModelConfig c;
  c.dim = 768;
  c.hidden_dim = 2048;
  c.n_layers = 12;
  c.n_heads = 12;
  c.n_kv_heads = 12;
  c.vocab_size = 32000;
  c.max_seq_len = 4096;
  return c;
}

/// This machine's physical memory in bytes (0 when unknown).
inline double physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? double(pages) * double(page) : 0.0;
}

/// ConfigError unless `bytes` fit in physical memory: a size that cannot fit is refused with the option that asked
/// for it, before the allocation, instead of a std::bad_alloc (or the OOM killer) halfway through.
inline void check_fits_memory(double bytes, const std::string& what) {
  const double have = physical_memory_bytes();
  if (have > 0 && bytes > have)
    throw ConfigError(what + " needs " + std::to_string(bytes / double(1 << 30)) + " GiB, more than this machine's " +
                      std::to_string(have / double(1 << 30)) + " GiB of memory");
}

/// ConfigError unless rp + rs registers leave room for a prompt token in `c`'s context (and fit in memory).
inline void check_registers(const ModelConfig& c, int rp, int rs) {
  if (rp < 0 || rs < 0 || std::int64_t{rp} + rs >= c.max_seq_len)
    throw ConfigError("--prefix-registers " + std::to_string(rp) + " + --suffix-registers " + std::to_string(rs) +
                      " leave no room for a prompt in the model's context of " + std::to_string(c.max_seq_len) +
                      " positions");
  check_fits_memory(double(rp + rs) * c.dim * sizeof(float), "the registers");
}

/// The --model / --preset / --seed options and the loading behind them.
struct ModelSource {
  std::string path;
  std::string preset = "cpu";
  std::uint64_t seed = 7;
  std::string desc;

  void add_options(CLI::App& app) {
    app.add_option("--model", path, "Hugging Face model directory or llama2.c .bin checkpoint (default: random model)");
    app.add_option("--preset", preset, "shape of the random model: cpu (~30M parameters) or 110m")
        ->check(CLI::IsMember({"cpu", "110m"}));
    app.add_option("--seed", seed, "seed of the built-in random model");
  }

  /// Loads the model; a model without registers of its own gets random ones (rp, rs) so EARN schedules are defined.
  ModelWeights load(int rp, int rs) {
    ModelWeights w;
    if (path.empty()) {
      const ModelConfig c = preset == "110m" ? llama_110m() : cpu_sized_llama();
      check_registers(c, rp, rs);
      w = random_weights(c, {.seed = seed, .prefix_registers = rp, .suffix_registers = rs});
      desc = "built-in random Llama, preset " + preset + " (no checkpoint given)";
      return w;
    }
    // The non-throwing overload: a path past the file-name limit is the loader's IoError, not a filesystem_error.
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) {
      w = io::load_hf(path);
      desc = "Hugging Face model " + path;
    } else {
      w = io::load_llama2c(path);
      desc = "llama2.c checkpoint " + path;
    }
    if (w.registers.count() == 0) {
      // A checkpoint trained without EARN has no registers: add random ones so every split layer is defined.
      // Timings and KV sizes are meaningful; the recommendations of such a model are not.
      check_registers(w.config, rp, rs);
      const ModelWeights r = random_weights(w.config, {.seed = seed, .prefix_registers = rp, .suffix_registers = rs});
      w.registers = r.registers;
      desc += " (+ random registers)";
    }
    return w;
  }
  const std::string& description() const { return desc; }
};

}  // namespace earn::examples
