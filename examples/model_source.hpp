// examples/model_source.hpp - where an example's model comes from: a checkpoint path, or a built-in random model.
#pragma once

#include <CLI/CLI.hpp>

#include <filesystem>
#include <string>

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
      w = random_weights(preset == "110m" ? llama_110m() : cpu_sized_llama(),
                         {.seed = seed, .prefix_registers = rp, .suffix_registers = rs});
      desc = "built-in random Llama, preset " + preset + " (no checkpoint given)";
      return w;
    }
    if (std::filesystem::is_directory(path)) {
      w = io::load_hf(path);
      desc = "Hugging Face model " + path;
    } else {
      w = io::load_llama2c(path);
      desc = "llama2.c checkpoint " + path;
    }
    if (w.registers.count() == 0) {
      // A checkpoint trained without EARN has no registers: add random ones so every split layer is defined.
      // Timings and KV sizes are meaningful; the recommendations of such a model are not.
      const ModelWeights r = random_weights(w.config, {.seed = seed, .prefix_registers = rp, .suffix_registers = rs});
      w.registers = r.registers;
      desc += " (+ random registers)";
    }
    return w;
  }
  const std::string& description() const { return desc; }
};

}  // namespace earn::examples
