// Tests of earn/io/hf.hpp: model directories the test writes itself (tensor by tensor through the safetensors
// writer, config.json as JSON it builds) in transformers 4.x and 5.x styles, single-file and sharded; every
// malformed or unsupported input ends in a typed error naming the file and field; save_hf round trips, including
// the interleaved -> rotate-half RoPE permutation, checked by running both models.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <unistd.h>
#include <vector>

#include <nlohmann/json.hpp>

#include "earn/io/hf.hpp"
#include "earn/io/llama2c.hpp"
#include "earn/model/engine.hpp"
#include "earn/schedule/presets.hpp"
#include "support.hpp"

namespace fs = std::filesystem;
using earn::test::TempDir;
using earn::io::TensorToWrite;
using json = nlohmann::json;

namespace {

earn::ModelConfig small_config(bool qwen2, bool tied) {
  earn::ModelConfig c;
  c.dim = 16;
  c.hidden_dim = 24;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 32;
  c.max_seq_len = 32;
  c.rope_theta = 5000.0f;
  c.norm_eps = 1e-5f;
  c.tied_embeddings = tied;
  c.qkv_bias = qwen2;
  c.rope_style = earn::RopeStyle::kRotateHalf;
  return c;
}

// config.json as transformers 5.x writes it for `c`.
json config_5x(const earn::ModelConfig& c) {
  const bool qwen2 = c.qkv_bias;
  json j = {{"architectures", {qwen2 ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
            {"model_type", qwen2 ? "qwen2" : "llama"},
            {"hidden_size", c.dim},
            {"intermediate_size", c.hidden_dim},
            {"num_hidden_layers", c.n_layers},
            {"num_attention_heads", c.n_heads},
            {"num_key_value_heads", c.n_kv_heads},
            {"head_dim", c.dim / c.n_heads},
            {"vocab_size", c.vocab_size},
            {"max_position_embeddings", c.max_seq_len},
            {"rms_norm_eps", 1e-5},
            {"tie_word_embeddings", c.tied_embeddings},
            {"hidden_act", "silu"},
            {"rope_parameters", {{"rope_theta", 5000.0}, {"rope_type", "default"}}},
            {"dtype", "float32"},
            {"transformers_version", "5.17.0"}};
  if (qwen2) {
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
    j["layer_types"] = json::array();
    for (int i = 0; i < c.n_layers; ++i) j["layer_types"].push_back("full_attention");
  } else {
    j["attention_bias"] = false;
    j["mlp_bias"] = false;
  }
  return j;
}

// The same model as transformers 4.x wrote it: rope_theta at the top, rope_scaling null, torch_dtype.
json config_4x(const earn::ModelConfig& c) {
  json j = config_5x(c);
  j.erase("rope_parameters");
  j.erase("dtype");
  j.erase("layer_types");
  j.erase("head_dim");
  j["rope_theta"] = 5000.0;
  j["rope_scaling"] = nullptr;
  j["torch_dtype"] = "float32";
  j["transformers_version"] = "4.46.0";
  return j;
}

void write_json(const fs::path& file, const json& j) {
  std::ofstream out(file);
  out << j.dump(2);
}

// Hugging Face names of every tensor of `w`, built from member tables (independent of save_hf's code).
std::vector<TensorToWrite> hf_tensors(const earn::ModelWeights& w) {
  using L = earn::LayerWeights;
  static const std::vector<std::pair<std::string, earn::Matrix L::*>> mats = {
      {"self_attn.q_proj.weight", &L::wq}, {"self_attn.k_proj.weight", &L::wk}, {"self_attn.v_proj.weight", &L::wv},
      {"self_attn.o_proj.weight", &L::wo}, {"mlp.gate_proj.weight", &L::w1},    {"mlp.up_proj.weight", &L::w3},
      {"mlp.down_proj.weight", &L::w2}};
  static const std::vector<std::pair<std::string, earn::Vector L::*>> vecs = {
      {"input_layernorm.weight", &L::attn_norm}, {"post_attention_layernorm.weight", &L::ffn_norm},
      {"self_attn.q_proj.bias", &L::bq},         {"self_attn.k_proj.bias", &L::bk},
      {"self_attn.v_proj.bias", &L::bv}};
  std::vector<TensorToWrite> out = {earn::io::tensor_to_write("model.embed_tokens.weight", w.tok_embeddings),
                                    earn::io::tensor_to_write("model.norm.weight", w.final_norm)};
  if (w.lm_head.size()) out.push_back(earn::io::tensor_to_write("lm_head.weight", w.lm_head));
  for (std::size_t i = 0; i < w.layers.size(); ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    for (const auto& [n, m] : mats) out.push_back(earn::io::tensor_to_write(p + n, w.layers[i].*m));
    for (const auto& [n, v] : vecs)
      if ((w.layers[i].*v).size()) out.push_back(earn::io::tensor_to_write(p + n, w.layers[i].*v));
  }
  return out;
}

std::vector<TensorToWrite> without(std::vector<TensorToWrite> t, const std::string& name) {
  std::erase_if(t, [&](const TensorToWrite& x) { return x.name == name; });
  return t;
}

earn::ModelWeights model(bool qwen2, bool tied, int prefix = 0, int suffix = 0) {
  earn::RandomInit init;
  init.prefix_registers = prefix;
  init.suffix_registers = suffix;
  init.seed = qwen2 ? 77 : 78;
  return earn::random_weights(small_config(qwen2, tied), init);
}

// Equal shapes and equal values (Eigen's == on different shapes is undefined, not false).
template <class A, class B>
bool same(const A& a, const B& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && (a.size() == 0 || a == b);
}

void check_same_weights(const earn::ModelWeights& a, const earn::ModelWeights& b) {
  CHECK(a.config.dim == b.config.dim);
  CHECK(a.config.hidden_dim == b.config.hidden_dim);
  CHECK(a.config.n_layers == b.config.n_layers);
  CHECK(a.config.n_heads == b.config.n_heads);
  CHECK(a.config.n_kv_heads == b.config.n_kv_heads);
  CHECK(a.config.vocab_size == b.config.vocab_size);
  CHECK(a.config.max_seq_len == b.config.max_seq_len);
  CHECK(a.config.rope_theta == b.config.rope_theta);
  CHECK(a.config.norm_eps == b.config.norm_eps);
  CHECK(a.config.tied_embeddings == b.config.tied_embeddings);
  CHECK(a.config.qkv_bias == b.config.qkv_bias);
  // Every tensor by its HF name (the tables above), registers too: same set, shapes and bits.
  auto all = [](const earn::ModelWeights& w) {
    auto t = hf_tensors(w);
    t.push_back(earn::io::tensor_to_write("earn.prefix_registers", w.registers.prefix));
    t.push_back(earn::io::tensor_to_write("earn.suffix_registers", w.registers.suffix));
    return t;
  };
  const auto ta = all(a), tb = all(b);
  REQUIRE(ta.size() == tb.size());
  for (std::size_t i = 0; i < ta.size(); ++i) {
    CAPTURE(ta[i].name);
    CHECK(ta[i].name == tb[i].name);
    CHECK((ta[i].shape == tb[i].shape || ta[i].data.empty()));  // an empty register block is [0, 0] or [0, dim]
    CHECK(std::equal(ta[i].data.begin(), ta[i].data.end(), tb[i].data.begin(), tb[i].data.end()));
  }
  CHECK(a.split_layer == b.split_layer);
  CHECK(a.trained_schedule == b.trained_schedule);
}

// Expects load_hf(dir) to throw E with a message containing every piece of `parts`.
template <class E>
void expect_error(const fs::path& dir, const std::vector<std::string>& parts) {
  try {
    (void)earn::io::load_hf(dir);
    FAIL("loaded; expected an error mentioning " << parts.front());
  } catch (const E& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) CHECK_MESSAGE(msg.find(p) != std::string::npos, msg);
  }
}

// The logits of prefilling `tokens` with the dense engine.
earn::Matrix run(const earn::ModelWeights& w, const std::vector<int>& tokens) {
  earn::Engine<earn::DenseSchedule> engine(w);
  auto st = engine.make_state(earn::StateOptions{1, 1, static_cast<int>(tokens.size()), 1});
  return engine.prefill_all_logits(st, 0, tokens);
}

}  // namespace

TEST_CASE("a Llama directory written tensor by tensor loads exactly (5.x config, registers, split layer)") {
  TempDir d;
  earn::ModelWeights w = model(false, false, 2, 3);
  w.split_layer = 1;
  auto t = hf_tensors(w);
  t.push_back(earn::io::tensor_to_write("earn.prefix_registers", w.registers.prefix));
  t.push_back(earn::io::tensor_to_write("earn.suffix_registers", w.registers.suffix));
  earn::io::write_safetensors(d.path / "model.safetensors", t, {{"format", "pt"}, {"earn.split_layer", "1"}});
  write_json(d.path / "config.json", config_5x(w.config));
  const earn::ModelWeights got = earn::io::load_hf(d.path);
  check_same_weights(w, got);
  CHECK(got.config.rope_style == earn::RopeStyle::kRotateHalf);
  CHECK(got.registers.count() == 5);
}

TEST_CASE("4.x config style and the documented defaults") {
  TempDir d;
  earn::ModelWeights w = model(false, false);
  earn::io::write_safetensors(d.path / "model.safetensors", hf_tensors(w));
  SUBCASE("top-level rope_theta") {
    write_json(d.path / "config.json", config_4x(w.config));
    const auto got = earn::io::load_hf(d.path);
    check_same_weights(w, got);
  }
  SUBCASE("rope_theta absent -> 10000, rms_norm_eps absent -> 1e-6, tie absent -> untied") {
    json j = config_4x(w.config);
    j.erase("rope_theta");
    j.erase("rms_norm_eps");
    j.erase("tie_word_embeddings");
    write_json(d.path / "config.json", j);
    const auto got = earn::io::load_hf(d.path);
    CHECK(got.config.rope_theta == 10000.0f);
    CHECK(got.config.norm_eps == 1e-6f);
    CHECK(!got.config.tied_embeddings);
  }
  SUBCASE("config.json's earn.split_layer") {
    json j = config_5x(w.config);
    j["earn"] = {{"split_layer", 2}};
    write_json(d.path / "config.json", j);
    CHECK(earn::io::load_hf(d.path).split_layer == 2);
  }
}

TEST_CASE("BOS / EOS ids: config.json, then generation_config.json over it; save_hf writes them back") {
  TempDir d;
  earn::ModelWeights w = model(false, false);
  earn::io::write_safetensors(d.path / "model.safetensors", hf_tensors(w));
  json j = config_5x(w.config);
  SUBCASE("absent: none stated") {
    write_json(d.path / "config.json", j);
    const auto c = earn::io::load_hf(d.path).config;
    CHECK(c.bos_token_id == -1);
    CHECK(c.eos_token_ids.empty());
  }
  SUBCASE("one id each, and null meaning absent") {
    j["bos_token_id"] = 1;
    j["eos_token_id"] = 2;
    write_json(d.path / "config.json", j);
    auto c = earn::io::load_hf(d.path).config;
    CHECK(c.bos_token_id == 1);
    CHECK(c.eos_token_ids == std::vector<int>{2});
    j["bos_token_id"] = nullptr;
    write_json(d.path / "config.json", j);
    CHECK(earn::io::load_hf(d.path).config.bos_token_id == -1);
  }
  SUBCASE("a list of EOS ids, overridden by generation_config.json") {
    j["eos_token_id"] = {2, 7};
    write_json(d.path / "config.json", j);
    CHECK(earn::io::load_hf(d.path).config.eos_token_ids == std::vector<int>{2, 7});
    write_json(d.path / "generation_config.json", json{{"bos_token_id", 3}, {"eos_token_id", {5, 6, 9}}});
    const auto c = earn::io::load_hf(d.path).config;
    CHECK(c.bos_token_id == 3);
    CHECK(c.eos_token_ids == std::vector<int>{5, 6, 9});
    // An id outside the vocabulary in generation_config.json names that file.
    write_json(d.path / "generation_config.json", json{{"eos_token_id", 1 << 20}});
    expect_error<earn::ConfigError>(d.path, {"generation_config.json", "outside the vocabulary"});
    write_json(d.path / "generation_config.json", json::array({1}));
    expect_error<earn::FormatError>(d.path, {"generation_config.json", "is not an object"});
  }
  SUBCASE("save_hf round trip") {
    w.config.bos_token_id = 1;
    w.config.eos_token_ids = {2, 4};
    TempDir out;
    earn::io::save_hf(out.path, w);
    const auto c = earn::io::load_hf(out.path).config;
    CHECK(c.bos_token_id == 1);
    CHECK(c.eos_token_ids == std::vector<int>{2, 4});
  }
}

TEST_CASE("Llama without num_key_value_heads has as many kv heads as heads") {
  TempDir d;
  earn::ModelConfig c = small_config(false, true);
  c.n_kv_heads = c.n_heads;
  const auto w = earn::random_weights(c, earn::RandomInit{5, 1.0f, 0, 0});
  earn::io::write_safetensors(d.path / "model.safetensors", hf_tensors(w));
  json j = config_5x(c);
  j.erase("num_key_value_heads");
  write_json(d.path / "config.json", j);
  const auto got = earn::io::load_hf(d.path);
  CHECK(got.config.n_kv_heads == 4);
  check_same_weights(w, got);
}

TEST_CASE("Qwen2 reads q/k/v biases; a tied head ignores a stored lm_head") {
  TempDir d;
  const earn::ModelWeights w = model(true, true);
  auto t = hf_tensors(w);
  const earn::Matrix stray = earn::Matrix::Constant(32, 16, 9.0f);
  t.push_back(earn::io::tensor_to_write("lm_head.weight", stray));  // transformers ties over it
  earn::io::write_safetensors(d.path / "model.safetensors", t);
  write_json(d.path / "config.json", config_5x(w.config));
  const auto got = earn::io::load_hf(d.path);
  check_same_weights(w, got);
  CHECK(got.config.qkv_bias);
  CHECK(got.lm_head.size() == 0);
  CHECK(&got.classifier() == &got.tok_embeddings);
}

TEST_CASE("sharded directories: index and shards are cross-checked") {
  TempDir d;
  const earn::ModelWeights w = model(true, false, 1, 1);
  auto all = hf_tensors(w);
  all.push_back(earn::io::tensor_to_write("earn.prefix_registers", w.registers.prefix));
  all.push_back(earn::io::tensor_to_write("earn.suffix_registers", w.registers.suffix));
  // Three shards, round-robin, and the index that lists them.
  auto write_shards = [&](const std::vector<TensorToWrite>& tensors, const std::function<void(json&)>& edit) {
    std::vector<std::vector<TensorToWrite>> shards(3);
    json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const std::string file = "model-0000" + std::to_string(i % 3 + 1) + "-of-00003.safetensors";
      shards[i % 3].push_back(tensors[i]);
      index["weight_map"][tensors[i].name] = file;
    }
    for (int s = 0; s < 3; ++s)
      earn::io::write_safetensors(d.path / ("model-0000" + std::to_string(s + 1) + "-of-00003.safetensors"),
                                  shards[std::size_t(s)], {{"format", "pt"}});
    edit(index);
    write_json(d.path / "model.safetensors.index.json", index);
  };
  write_json(d.path / "config.json", config_5x(w.config));
  const std::string idx = "model.safetensors.index.json";

  SUBCASE("a consistent index loads") {
    write_shards(all, [](json&) {});
    check_same_weights(w, earn::io::load_hf(d.path));
  }
  SUBCASE("a missing shard") {
    write_shards(all, [](json&) {});
    fs::remove(d.path / "model-00002-of-00003.safetensors");
    expect_error<earn::FormatError>(d.path, {idx, "model-00002-of-00003.safetensors", "not found"});
  }
  SUBCASE("a shard name past the file-name limit is not found, not a std::filesystem_error") {
    // Fuzzer finding (tests/fuzz/regressions/hf): is_regular_file's throwing overload let filesystem_error escape.
    const std::string longname(300, 's');
    write_shards(all, [&](json& j) { j["weight_map"]["model.norm.weight"] = longname; });
    expect_error<earn::FormatError>(d.path, {idx, "weight_map.model.norm.weight", longname, "not found"});
  }
  SUBCASE("a shard path that leaves the directory") {
    write_shards(all, [](json& j) { j["weight_map"]["model.norm.weight"] = "../model-00001-of-00003.safetensors"; });
    expect_error<earn::FormatError>(d.path, {idx, "weight_map.model.norm.weight", "not a plain file name"});
  }
  SUBCASE("a tensor the index places in the wrong shard (present in one, listed for another)") {
    write_shards(all, [](json& j) { j["weight_map"]["model.norm.weight"] = "model-00003-of-00003.safetensors"; });
    expect_error<earn::FormatError>(d.path, {"model-00002-of-00003.safetensors: model.norm.weight", "lists it in"});
  }
  SUBCASE("a tensor present in two shards") {
    auto dup = all;
    dup.push_back(dup[1]);  // lands in another shard than dup[1] (3 shards, round robin, different index)
    REQUIRE(dup.size() % 3 != 2);
    write_shards(dup, [](json&) {});
    expect_error<earn::FormatError>(d.path, {dup[1].name, "lists it in"});
  }
  SUBCASE("a shard tensor the index does not list") {
    write_shards(all, [](json& j) { j["weight_map"].erase("model.layers.0.mlp.up_proj.weight"); });
    expect_error<earn::FormatError>(d.path, {"model.layers.0.mlp.up_proj.weight", "not listed"});
  }
  SUBCASE("a needed tensor missing from the whole model") {
    write_shards(without(all, "model.layers.1.self_attn.v_proj.bias"), [](json&) {});
    expect_error<earn::FormatError>(d.path, {idx, "model.layers.1.self_attn.v_proj.bias", "tensor missing"});
  }
  SUBCASE("an index that is not JSON / has no weight_map") {
    write_shards(all, [](json&) {});
    std::ofstream(d.path / idx) << "{ nope";
    expect_error<earn::FormatError>(d.path, {idx, "does not parse"});
    write_json(d.path / idx, json{{"metadata", json::object()}});
    expect_error<earn::FormatError>(d.path, {idx, "weight_map"});
  }
}

TEST_CASE("config.json: missing, malformed and unsupported fields are typed errors naming the field") {
  TempDir d;
  const earn::ModelWeights llama = model(false, false);
  const earn::ModelWeights qwen = model(true, false);
  struct Case {
    const char* what;
    bool qwen2;
    std::function<void(json&)> edit;
    bool config_error;  // else FormatError
    std::string field;
  };
  const std::vector<Case> cases = {
      {"hidden_size missing", false, [](json& j) { j.erase("hidden_size"); }, false, "hidden_size: missing"},
      {"hidden_size a string", false, [](json& j) { j["hidden_size"] = "16"; }, false, "hidden_size: expected an integer"},
      {"hidden_size negative", false, [](json& j) { j["hidden_size"] = -16; }, false, "hidden_size"},
      {"vocab_size fractional", false, [](json& j) { j["vocab_size"] = 32.5; }, false, "vocab_size"},
      {"num_hidden_layers huge", false, [](json& j) { j["num_hidden_layers"] = 1ll << 40; }, false,
       "num_hidden_layers"},
      {"architectures missing", false, [](json& j) { j.erase("architectures"); }, false, "architectures"},
      {"unsupported architecture", false, [](json& j) { j["architectures"] = {"MistralForCausalLM"}; }, true,
       "architectures: 'MistralForCausalLM' is not supported"},
      {"model_type mismatch", false, [](json& j) { j["model_type"] = "qwen2"; }, true, "model_type"},
      {"rope_type llama3", false, [](json& j) { j["rope_parameters"]["rope_type"] = "llama3"; }, true,
       "rope_parameters.rope_type: 'llama3' RoPE scaling is not supported"},
      {"rope_parameters without theta", false, [](json& j) { j["rope_parameters"].erase("rope_theta"); }, false,
       "rope_parameters.rope_theta: missing"},
      {"4.x rope_scaling linear", false,
       [](json& j) { j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}}; }, true, "rope_scaling.type"},
      {"partial rotary", false, [](json& j) { j["rope_parameters"]["partial_rotary_factor"] = 0.5; }, true,
       "partial_rotary_factor"},
      // Valid JSON doubles past float range became +inf and were accepted.
      {"rms_norm_eps past float range", false, [](json& j) { j["rms_norm_eps"] = 1e39; }, false,
       "rms_norm_eps: 1e+39 is outside the float range"},
      {"rope_theta past float range", false, [](json& j) { j["rope_parameters"]["rope_theta"] = 1e300; }, false,
       "rope_theta: 1e+300 is outside the float range"},
      {"4.x rope_theta past float range", false,
       [](json& j) { j.erase("rope_parameters"); j["rope_theta"] = -1e39; }, false, "rope_theta: -1e+39 is outside the float range"},
      {"rms_norm_eps below float range", false, [](json& j) { j["rms_norm_eps"] = 1e-50; }, true,
       "norm_eps must be positive"},
      {"conflicting rope_theta", false, [](json& j) { j["rope_theta"] = 10000.0; }, false, "rope_theta"},
      {"head_dim not hidden/heads", false, [](json& j) { j["head_dim"] = 8; }, true, "head_dim: 8 differs"},
      {"gelu", false, [](json& j) { j["hidden_act"] = "gelu"; }, true, "hidden_act"},
      {"Llama attention_bias", false, [](json& j) { j["attention_bias"] = true; }, true, "attention_bias"},
      {"Llama mlp_bias", false, [](json& j) { j["mlp_bias"] = true; }, true, "mlp_bias"},
      {"tie_word_embeddings not a bool", false, [](json& j) { j["tie_word_embeddings"] = "yes"; }, false,
       "tie_word_embeddings"},
      {"heads do not divide hidden", false, [](json& j) { j["num_attention_heads"] = 3; j.erase("head_dim"); },
       true, "divisible"},
      {"kv heads do not divide heads", false, [](json& j) { j["num_key_value_heads"] = 3; }, true, "multiple"},
      {"earn.split_layer past the layers", false, [](json& j) { j["earn"] = {{"split_layer", 3}}; }, false,
       "earn.split_layer"},
      {"config not an object", false, [](json& j) { j = json::array({1}); }, false, "is not an object"},
      {"Qwen2 sliding window", true, [](json& j) { j["use_sliding_window"] = true; }, true, "use_sliding_window"},
      {"Qwen2 sliding layer", true, [](json& j) { j["layer_types"][1] = "sliding_attention"; }, true, "layer_types"},
      {"Qwen2 without num_key_value_heads", true, [](json& j) { j.erase("num_key_value_heads"); }, false,
       "num_key_value_heads: missing"},
      {"eos_token_id a string", false, [](json& j) { j["eos_token_id"] = "2"; }, false, "eos_token_id: expected"},
      {"eos_token_id negative in a list", false, [](json& j) { j["eos_token_id"] = {2, -1}; }, false, "eos_token_id"},
      {"bos_token_id fractional", false, [](json& j) { j["bos_token_id"] = 1.5; }, false, "bos_token_id"},
      {"eos_token_id past the vocabulary", false, [](json& j) { j["eos_token_id"] = 4096; }, true,
       "eos token id 4096 is outside the vocabulary"},
  };
  earn::io::write_safetensors(d.path / "model.safetensors", hf_tensors(llama));
  TempDir dq;
  earn::io::write_safetensors(dq.path / "model.safetensors", hf_tensors(qwen));
  for (const Case& c : cases) {
    CAPTURE(c.what);
    const fs::path dir = c.qwen2 ? dq.path : d.path;
    json j = config_5x((c.qwen2 ? qwen : llama).config);
    c.edit(j);
    write_json(dir / "config.json", j);
    if (c.config_error)
      expect_error<earn::ConfigError>(dir, {"config.json", c.field});
    else
      expect_error<earn::FormatError>(dir, {"config.json", c.field});
  }
  // Not JSON at all, or absent.
  std::ofstream(d.path / "config.json") << "{\"hidden_size\": 16,";
  expect_error<earn::FormatError>(d.path, {"config.json", "does not parse"});
  fs::remove(d.path / "config.json");
  expect_error<earn::IoError>(d.path, {"config.json"});
  // A directory name past the file-name limit: IoError saying so, not a std::filesystem_error.
  expect_error<earn::IoError>(d.path / std::string(300, 'd'), {"File name too long"});
}

TEST_CASE("ModelConfig::validate refuses non-finite and non-positive numerics") {
  earn::ModelConfig c = small_config(false, false);
  c.validate();
  for (float bad : {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(), 0.0f, -1.0f}) {
    CAPTURE(bad);
    earn::ModelConfig r = c, e = c;
    r.rope_theta = bad;
    e.norm_eps = bad;
    CHECK_THROWS_WITH_AS(r.validate(), doctest::Contains("rope_theta must be positive and finite"), earn::ConfigError);
    CHECK_THROWS_WITH_AS(e.validate(), doctest::Contains("norm_eps must be positive and finite"), earn::ConfigError);
  }
}

TEST_CASE("weights: missing, misshapen and unexpected tensors name the file and tensor") {
  TempDir d;
  earn::ModelWeights w = model(false, false, 1, 1);
  write_json(d.path / "config.json", config_5x(w.config));
  const auto file = (d.path / "model.safetensors").string();
  auto write = [&](const std::vector<TensorToWrite>& t, std::map<std::string, std::string> meta = {}) {
    earn::io::write_safetensors(d.path / "model.safetensors", t, meta);
  };
  SUBCASE("missing layer tensor") {
    write(without(hf_tensors(w), "model.layers.1.mlp.up_proj.weight"));
    expect_error<earn::FormatError>(d.path, {file, "model.layers.1.mlp.up_proj.weight: tensor missing"});
  }
  SUBCASE("missing untied head") {
    write(without(hf_tensors(w), "lm_head.weight"));
    expect_error<earn::FormatError>(d.path, {file, "lm_head.weight: tensor missing"});
  }
  SUBCASE("transposed k_proj") {
    const earn::Matrix wkT = w.layers[0].wk.transpose();
    auto t = without(hf_tensors(w), "model.layers.0.self_attn.k_proj.weight");
    t.push_back(earn::io::tensor_to_write("model.layers.0.self_attn.k_proj.weight", wkT));
    write(t);
    expect_error<earn::FormatError>(d.path,
                                    {file, "model.layers.0.self_attn.k_proj.weight: shape [16, 8], expected [8, 16]"});
  }
  SUBCASE("a layer beyond num_hidden_layers") {
    auto t = hf_tensors(w);
    t.push_back(earn::io::tensor_to_write("model.layers.2.input_layernorm.weight", w.final_norm));
    write(t);
    expect_error<earn::FormatError>(d.path, {file, "model.layers.2.input_layernorm.weight", "unexpected tensor"});
  }
  SUBCASE("a bias Llama does not have") {
    auto t = hf_tensors(w);
    const earn::Vector b = earn::Vector::Zero(16);
    t.push_back(earn::io::tensor_to_write("model.layers.0.self_attn.q_proj.bias", b));
    write(t);
    expect_error<earn::FormatError>(d.path, {"model.layers.0.self_attn.q_proj.bias", "unexpected tensor"});
  }
  SUBCASE("old checkpoints' rotary inv_freq buffers are tolerated") {
    auto t = hf_tensors(w);
    const earn::Vector inv = earn::Vector::Ones(2);
    t.push_back(earn::io::tensor_to_write("model.layers.0.self_attn.rotary_emb.inv_freq", inv));
    write(t);
    CHECK_NOTHROW((void)earn::io::load_hf(d.path));
  }
  SUBCASE("registers of the wrong width") {
    auto t = hf_tensors(w);
    const earn::Matrix r = earn::Matrix::Zero(2, 15);
    t.push_back(earn::io::tensor_to_write("earn.prefix_registers", r));
    write(t);
    expect_error<earn::FormatError>(d.path, {file, "earn.prefix_registers: shape [2, 15], expected [rows, 16]"});
  }
  SUBCASE("split layer metadata: not a number, or disagreeing with config.json") {
    write(hf_tensors(w), {{"earn.split_layer", "two"}});
    expect_error<earn::FormatError>(d.path, {file, "earn.split_layer", "'two'"});
    write(hf_tensors(w), {{"earn.split_layer", "1"}});
    json j = config_5x(w.config);
    j["earn"] = {{"split_layer", 2}};
    write_json(d.path / "config.json", j);
    expect_error<earn::FormatError>(d.path, {"config.json", "earn.split_layer", "disagrees"});
  }
  SUBCASE("recorded schedule: only gist, and config.json agreeing with the metadata") {
    write(hf_tensors(w), {{"earn.schedule", "earn"}});
    expect_error<earn::FormatError>(d.path, {file, "earn.schedule", "'earn' is not gist"});
    write(hf_tensors(w), {{"earn.schedule", "gist"}});
    CHECK(earn::io::load_hf(d.path).trained_schedule == "gist");
    json j = config_5x(w.config);
    j["earn"] = {{"schedule", "sparse"}};
    write_json(d.path / "config.json", j);
    expect_error<earn::FormatError>(d.path, {"config.json", "earn.schedule", "'sparse'"});
  }
  SUBCASE("split layer metadata past the layers") {
    write(hf_tensors(w), {{"earn.split_layer", "7"}});
    expect_error<earn::ConfigError>(d.path, {d.path.string(), "split layer 7"});
  }
  SUBCASE("no weights at all") {
    expect_error<earn::IoError>(d.path, {d.path.string(), "model.safetensors"});
  }
  SUBCASE("a corrupt weights file") {
    std::ofstream(d.path / "model.safetensors", std::ios::binary) << "garbage!";
    expect_error<earn::FormatError>(d.path, {file});
  }
}

TEST_CASE("save_hf writes what load_hf reads back exactly (Qwen2, registers, split layer)") {
  TempDir d;
  earn::ModelWeights w = model(true, false, 2, 1);
  w.split_layer = 1;
  earn::io::save_hf(d.path, w);
  check_same_weights(w, earn::io::load_hf(d.path));
  w.trained_schedule = "gist";  // a Gist model's record travels with it
  earn::io::save_hf(d.path, w);
  check_same_weights(w, earn::io::load_hf(d.path));
  CHECK(earn::io::SafetensorsFile::open(d.path / "model.safetensors").metadata().at("earn.schedule") == "gist");
  w.trained_schedule.clear();
  earn::io::save_hf(d.path, w);
  std::ifstream in(d.path / "config.json");
  const json j = json::parse(in);
  CHECK(j["architectures"] == json::array({"Qwen2ForCausalLM"}));
  CHECK(j["rope_parameters"]["rope_theta"] == 5000.0);
  CHECK(j["rms_norm_eps"] == 1e-5);  // the float's shortest spelling, not 9.99999974e-06
  const auto st = earn::io::SafetensorsFile::open(d.path / "model.safetensors");
  CHECK(st.metadata().at("earn.split_layer") == "1");
  CHECK(st.find("earn.prefix_registers")->shape == std::vector<std::int64_t>{2, 16});
}

TEST_CASE("save_hf permutes interleaved-RoPE weights so the rotate-half model computes the same logits") {
  TempDir d;
  earn::ModelConfig c = small_config(true, false);  // biases too: they are permuted with their rows
  c.rope_style = earn::RopeStyle::kInterleaved;
  const auto w = earn::random_weights(c, earn::RandomInit{9, 2.0f, 1, 1});
  earn::io::save_hf(d.path, w);
  const auto back = earn::io::load_hf(d.path);
  CHECK(back.config.rope_style == earn::RopeStyle::kRotateHalf);
  CHECK(!same(back.layers[0].wq, w.layers[0].wq));  // the permutation did something
  CHECK(same(back.layers[0].wv, w.layers[0].wv));
  const std::vector<int> tokens = {1, 5, 9, 30, 2, 7, 7, 11};
  const earn::Matrix a = run(w, tokens), b = run(back, tokens);
  CHECK(((a - b).cwiseAbs().array() <= 1e-4f * a.cwiseAbs().array().max(1.0f)).all());
  CHECK((a - b).cwiseAbs().maxCoeff() < 1e-4f);
}

TEST_CASE("stories260K converted to a Hugging Face directory gives the llama2.c logits") {
  EARN_REQUIRE_SHARED(bin, "llama2c/stories260K.bin");
  TempDir d;
  const auto w = earn::io::load_llama2c(bin);
  earn::io::save_hf(d.path, w);
  const auto back = earn::io::load_hf(d.path);
  CHECK(back.config.tied_embeddings);
  const std::vector<int> tokens = {1, 403, 407, 261, 378, 429, 36, 295, 272, 431};
  const earn::Matrix a = run(w, tokens), b = run(back, tokens);
  CHECK(((a - b).cwiseAbs().array() <= 1e-4f * b.cwiseAbs().array().max(1.0f)).all());
}
