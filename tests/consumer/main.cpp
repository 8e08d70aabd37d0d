// Uses earn as a consumer would: umbrella header, a random model, one EARN generation.
#include <earn/earn.hpp>

#include <cstdio>

int main() {
  earn::ModelConfig c;
  c.dim = 16; c.hidden_dim = 24; c.n_layers = 2; c.n_heads = 2; c.n_kv_heads = 1; c.vocab_size = 20; c.max_seq_len = 32;
  const earn::ModelWeights w = earn::random_weights(c);
  earn::Engine<earn::EarnSchedule> engine(w, earn::EarnSchedule{1});
  const auto out = earn::generate(engine, std::vector<int>{1, 2, 3}, {.max_new_tokens = 4});
  std::printf("generated %zu tokens\n", out.size());
  return out.size() == 4 ? 0 : 1;
}
