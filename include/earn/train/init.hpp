// earn/train/init.hpp - the two starting points of training: a model from scratch on the code-token vocabulary,
// and an existing checkpoint (Hugging Face or llama2.c) given rows for the code tokens and the registers.
//
// From scratch (init_model), the initialisation is stated, seeded and platform-independent (earn::Rng, Box-Muller):
//   token embeddings, projections wq wk wv w1 w3, an untied head, registers   N(0, std)           (std = 0.02)
//   output projections wo, w2                                                N(0, std / sqrt(2 L)) (GPT-2's
//                                                                            residual scaling)
//   RMSNorm gains 1, q/k/v biases 0.
// Extending a checkpoint (extend_vocab): the code tokens are appended after the model's vocabulary (ItemVocab(old
// vocab)), their embedding rows (and head rows, when untied) drawn as N(mean of the old rows, std of the old rows'
// entries) so they start where the model's tokens live; registers N(0, std of the old embedding entries); every old
// parameter unchanged.
#pragma once

#include <cmath>
#include <cstdint>

#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"
#include "earn/model/weights.hpp"
#include "earn/rec/item_vocab.hpp"

namespace earn::train {

/// Settings of init_model.
struct InitOptions {
  std::uint64_t seed = 0;
  double std = 0.02;
  int prefix_registers = 1;
  int suffix_registers = 1;
};

namespace detail {
// N(0, 1) from two uniforms (Box-Muller), deterministic on every platform.
inline double normal(Rng& rng) {
  const double u1 = (static_cast<double>(rng.next_u64() >> 11) + 1.0) * (1.0 / 9007199254740993.0);  // (0, 1]
  const double u2 = static_cast<double>(rng.next_u64() >> 11) * (1.0 / 9007199254740992.0);         // [0, 1)
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}
inline void fill_normal(Matrix& m, Rng& rng, double mean, double std) {
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(mean + std * normal(rng));
}
}  // namespace detail

/// A model of config `c` initialised from scratch as the file comment states.
inline ModelWeights init_model(const ModelConfig& c, const InitOptions& o = {}) {
  c.validate();
  if (o.prefix_registers < 0 || o.suffix_registers < 0 || !(o.std > 0))
    throw ConfigError("init: register counts must be >= 0 and std > 0");
  ModelWeights w = random_weights(c, {.seed = o.seed, .prefix_registers = o.prefix_registers,
                                      .suffix_registers = o.suffix_registers});  // shapes; every value replaced below
  Rng rng(o.seed ^ 0x5EED5EED5EED5EEDull);
  const double out_std = o.std / std::sqrt(2.0 * c.n_layers);
  detail::fill_normal(w.tok_embeddings, rng, 0.0, o.std);
  detail::fill_normal(w.registers.prefix, rng, 0.0, o.std);
  detail::fill_normal(w.registers.suffix, rng, 0.0, o.std);
  for (auto& l : w.layers) {
    l.attn_norm.setOnes();
    l.ffn_norm.setOnes();
    for (Matrix* m : {&l.wq, &l.wk, &l.wv, &l.w1, &l.w3}) detail::fill_normal(*m, rng, 0.0, o.std);
    for (Matrix* m : {&l.wo, &l.w2}) detail::fill_normal(*m, rng, 0.0, out_std);
    for (Vector* b : {&l.bq, &l.bk, &l.bv}) b->setZero();
  }
  w.final_norm.setOnes();
  if (!c.tied_embeddings) detail::fill_normal(w.lm_head, rng, 0.0, o.std);
  return w;
}

/// `w` with the 4 x 256 code tokens appended to its vocabulary and `rp` + `rs` registers (replacing any it had), as
/// the file comment states. The returned model's vocabulary is rec::ItemVocab(w's vocab).size().
inline ModelWeights extend_vocab(const ModelWeights& w, int rp, int rs, std::uint64_t seed) {
  w.validate();
  if (rp < 0 || rs < 0) throw ConfigError("init: register counts must be >= 0");
  const ModelConfig& c = w.config;
  const rec::ItemVocab vocab(c.vocab_size);
  ModelWeights out = w;
  out.config.vocab_size = vocab.size();
  Rng rng(seed ^ 0xC0DEC0DEC0DEC0DEull);
  // Rows drawn around the existing rows: per column mean, one spread over all entries.
  auto extend = [&](const Matrix& old) {
    Matrix m(vocab.size(), c.dim);
    m.topRows(c.vocab_size) = old;
    const Eigen::RowVectorXd mean = old.cast<double>().colwise().mean();
    const double spread = std::sqrt((old.cast<double>().rowwise() - mean).array().square().mean());
    for (Index r = c.vocab_size; r < m.rows(); ++r)
      for (Index j = 0; j < c.dim; ++j) m(r, j) = static_cast<float>(mean[j] + spread * detail::normal(rng));
    return m;
  };
  out.tok_embeddings = extend(w.tok_embeddings);
  if (!c.tied_embeddings) out.lm_head = extend(w.lm_head);
  const double reg_std = std::sqrt(w.tok_embeddings.cast<double>().array().square().mean());
  out.registers.prefix.resize(rp, c.dim);
  out.registers.suffix.resize(rs, c.dim);
  detail::fill_normal(out.registers.prefix, rng, 0.0, reg_std);
  detail::fill_normal(out.registers.suffix, rng, 0.0, reg_std);
  out.validate();
  return out;
}

}  // namespace earn::train
