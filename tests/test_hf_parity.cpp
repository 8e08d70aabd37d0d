// Parity with Hugging Face transformers: each fixture under tests/fixtures/hf/ (made by tools/make_hf_fixtures.py
// with transformers 5.17 / torch 2.11, fp32 eager attention) is loaded with earn::io::load_hf and run through the
// CPU engine. Every logit of the prompt (all positions) and of each greedy step must match transformers' to
//   |earn - hf| <= 1e-4 * max(1, |hf|)   (per element, no averaging),
// and the greedy continuation must be the same token sequence.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "earn/io/hf.hpp"
#include "earn/model/engine.hpp"
#include "earn/schedule/presets.hpp"
#include "support.hpp"

namespace {

constexpr float kRelTol = 1e-4f;

struct Expected {
  std::vector<int> prompt;
  earn::Matrix prompt_logits;  // [T, vocab]
  std::vector<int> greedy_tokens;
  earn::Matrix greedy_logits;  // [N, vocab], row i predicts greedy_tokens[i]
  std::string saved_dtype, config_style;
};

earn::Matrix to_matrix(const nlohmann::json& rows) {
  earn::Matrix m(static_cast<earn::Index>(rows.size()), static_cast<earn::Index>(rows.at(0).size()));
  for (earn::Index i = 0; i < m.rows(); ++i) {
    REQUIRE(static_cast<earn::Index>(rows[i].size()) == m.cols());
    for (earn::Index j = 0; j < m.cols(); ++j) m(i, j) = rows[i][j].get<float>();
  }
  return m;
}

Expected read_expected(const std::filesystem::path& dir) {
  std::ifstream in(dir / "expected.json");
  REQUIRE(in);
  const auto j = nlohmann::json::parse(in);
  Expected e;
  e.prompt = j.at("prompt").get<std::vector<int>>();
  e.prompt_logits = to_matrix(j.at("prompt_logits"));
  e.greedy_tokens = j.at("greedy_tokens").get<std::vector<int>>();
  e.greedy_logits = to_matrix(j.at("greedy_logits"));
  e.saved_dtype = j.at("saved_dtype").get<std::string>();
  e.config_style = j.at("config_style").get<std::string>();
  return e;
}

// Worst |a - b| / max(1, |b|) over a row; NaN in either makes it infinite (NaN never passes).
float worst_rel_err(const earn::Matrix& a, const earn::Matrix& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  float worst = 0.0f;
  for (earn::Index i = 0; i < a.size(); ++i) {
    const float x = a.data()[i], y = b.data()[i];
    const float e = std::abs(x - y) / std::max(1.0f, std::abs(y));
    if (!(e <= worst)) worst = std::isnan(e) ? INFINITY : e;
  }
  return worst;
}

int argmax(const earn::Matrix& row) {
  earn::Index j = 0;
  row.row(0).maxCoeff(&j);
  return static_cast<int>(j);
}

void check_fixture(const std::string& name) {
  CAPTURE(name);
  const auto dir = earn::test::source_path("tests/fixtures/hf/" + name);
  const Expected e = read_expected(dir);
  const earn::ModelWeights w = earn::io::load_hf(dir);
  CHECK(w.registers.count() == 0);
  CHECK(w.config.vocab_size == e.prompt_logits.cols());

  earn::Engine<earn::DenseSchedule> engine(w);
  const int T = static_cast<int>(e.prompt.size()), N = static_cast<int>(e.greedy_tokens.size());
  auto st = engine.make_state(earn::StateOptions{1, 1, T, N});

  // Every prompt position.
  const earn::Matrix all = engine.prefill_all_logits(st, 0, e.prompt);
  const float prompt_err = worst_rel_err(all, e.prompt_logits);
  CHECK(prompt_err <= kRelTol);

  // Greedy continuation: prefill's last row predicts token 0, each decode step the next one.
  auto st2 = engine.make_state(earn::StateOptions{1, 1, T, N});
  earn::Matrix step = engine.prefill(st2, 0, e.prompt).transpose();
  const std::vector<int> row_user = {0};
  st2.set_rows(row_user);
  std::vector<int> got;
  float greedy_err = 0.0f;
  for (int i = 0; i < N; ++i) {
    CAPTURE(i);
    greedy_err = std::max(greedy_err, worst_rel_err(step, e.greedy_logits.middleRows(i, 1)));
    got.push_back(argmax(step));
    if (i + 1 < N) {
      const int tok = got.back();
      step = engine.decode(st2, std::span<const int>(&tok, 1));
    }
  }
  CHECK(greedy_err <= kRelTol);
  CHECK(got == e.greedy_tokens);
  MESSAGE(name << " (" << e.saved_dtype << ", config " << e.config_style << "): worst relative logit error prompt "
               << prompt_err << ", greedy " << greedy_err);
}

}  // namespace

TEST_CASE("HF parity: Llama, GQA, rope_theta 500000, untied, F32, 5.x config") { check_fixture("llama_gqa"); }
TEST_CASE("HF parity: Llama, tied embeddings, BF16 weights") { check_fixture("llama_tied_bf16"); }
TEST_CASE("HF parity: Qwen2 with q/k/v biases, MQA, four safetensors shards") { check_fixture("qwen2_sharded"); }
TEST_CASE("HF parity: Qwen2, tied, F16 weights, 4.x config (top-level rope_theta)") {
  check_fixture("qwen2_tied_f16_v4");
}

TEST_CASE("HF parity fixtures cover what they claim") {
  // The loader's view of the fixtures, so a regenerated fixture cannot silently drop a feature under test.
  const auto root = earn::test::source_path("tests/fixtures/hf");
  const auto gqa = earn::io::load_hf(root / "llama_gqa");
  CHECK(gqa.config.n_kv_heads * 2 == gqa.config.n_heads);
  CHECK(gqa.config.rope_theta == 500000.0f);
  CHECK(!gqa.config.tied_embeddings);
  CHECK(gqa.config.hidden_dim % 2 == 1);
  const auto tied = earn::io::load_hf(root / "llama_tied_bf16");
  CHECK(tied.config.tied_embeddings);
  CHECK(tied.lm_head.size() == 0);
  const auto qwen = earn::io::load_hf(root / "qwen2_sharded");
  CHECK(qwen.config.qkv_bias);
  CHECK(qwen.layers[0].bq.norm() > 0.0f);
  CHECK(std::filesystem::exists(root / "qwen2_sharded" / "model.safetensors.index.json"));
  CHECK(!std::filesystem::exists(root / "qwen2_sharded" / "model.safetensors"));
  const auto v4 = earn::io::read_hf_config(root / "qwen2_tied_f16_v4" / "config.json");
  CHECK(v4.model.rope_theta == 10000.0f);
  std::ifstream cfg(root / "qwen2_tied_f16_v4" / "config.json");
  const auto j = nlohmann::json::parse(cfg);
  CHECK(j.contains("rope_theta"));
  CHECK(!j.contains("rope_parameters"));
}
