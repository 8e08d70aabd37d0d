// earn/io/hf.hpp - loads (and saves) Hugging Face model directories of LlamaForCausalLM / Qwen2ForCausalLM.
//
// A directory holds config.json and either model.safetensors or model.safetensors.index.json with its shards
// (model.safetensors wins when both exist, as in transformers). F32, F16 and BF16 tensors are widened to fp32
// exactly. Tensor names (HF -> earn):
//   model.embed_tokens.weight                         tok_embeddings [vocab, dim]
//   model.layers.{i}.input_layernorm.weight           attn_norm [dim]
//   model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  wq, wk, wv, wo
//   model.layers.{i}.self_attn.{q,k,v}_proj.bias      bq, bk, bv (Qwen2 only)
//   model.layers.{i}.post_attention_layernorm.weight  ffn_norm [dim]
//   model.layers.{i}.mlp.{gate,up,down}_proj.weight   w1, w3, w2
//   model.norm.weight                                 final_norm [dim]
//   lm_head.weight                                    lm_head [vocab, dim]; absent (or ignored) when tied
// Any other tensor is an error (a layer beyond num_hidden_layers, a bias the architecture lacks), except the
// derived `*.rotary_emb.inv_freq` buffers old checkpoints carry.
//
// config.json: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size and
// max_position_embeddings are required; num_key_value_heads defaults to num_attention_heads for Llama (Qwen2's
// transformers default is a literal 32, so Qwen2 must state it); rms_norm_eps defaults to 1e-6,
// tie_word_embeddings to false (both architectures), rope_theta to 10000. RoPE comes from "rope_parameters"
// {"rope_type": "default", "rope_theta": ...} (transformers 5.x) or a top-level "rope_theta" (4.x); any scaling
// (rope_scaling / rope_type other than "default", partial_rotary_factor != 1) is refused with ConfigError, as is
// a head_dim other than hidden_size / num_attention_heads, a hidden_act other than silu, Llama's attention_bias
// (it also adds an o_proj bias earn has no slot for) or mlp_bias, and Qwen2 sliding-window layers.
//
// EARN extension (written by save_hf, ignored by transformers):
//   tensors   earn.prefix_registers [r_p, dim], earn.suffix_registers [r_s, dim]   -> weights.registers
//   metadata  "earn.split_layer": "<k>" in a safetensors __metadata__, or config.json "earn": {"split_layer": k}
//             -> weights.split_layer (both places, when present, must agree; absent: -1)
//             "earn.schedule": "gist" likewise -> weights.trained_schedule (a Gist model; absent: empty)
//
// Errors: malformed or missing fields and tensors throw FormatError "file: field: what"; unsupported features
// throw ConfigError naming the file and field; unreadable files throw IoError.
//
// \code
//   earn::ModelWeights w = earn::io::load_hf("models/Qwen2-0.5B");
//   earn::io::save_hf("out/with-registers", w);  // config.json + model.safetensors, F32
// \endcode
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "earn/core/config.hpp"
#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"
#include "earn/io/safetensors.hpp"
#include "earn/model/weights.hpp"

namespace earn::io {

/// The decoder families load_hf reads.
enum class HfArchitecture { kLlama, kQwen2 };

/// What config.json says: the model's shape and numerics, its family, and EARN's recorded split layer.
struct HfConfig {
  ModelConfig model;
  HfArchitecture architecture = HfArchitecture::kLlama;
  int split_layer = -1;  ///< config.json "earn": {"split_layer": k}; -1 when absent
  std::string schedule;  ///< config.json "earn": {"schedule": "gist"}; empty when absent
};

namespace detail {

/// Typed access to one JSON object's fields; every failure names the file and the field.
class JsonFields {
 public:
  JsonFields(const nlohmann::json& j, std::string file, std::string prefix = "")
      : j_(j), file_(std::move(file)), prefix_(std::move(prefix)) {}

  [[noreturn]] void bad(const std::string& key, const std::string& what) const {
    earn::detail::throw_format(file_, prefix_ + key, what);
  }
  [[noreturn]] void unsupported(const std::string& key, const std::string& what) const {
    throw ConfigError(file_ + ": " + prefix_ + key + ": " + what);
  }
  /// The field, or nullptr when absent or null (JSON null means "use the default" in HF configs).
  const nlohmann::json* get(const std::string& key) const {
    auto it = j_.find(key);
    return it == j_.end() || it->is_null() ? nullptr : &*it;
  }
  std::optional<std::int64_t> opt_int(const std::string& key) const {
    const auto* v = get(key);
    if (!v) return std::nullopt;
    if (v->is_number_unsigned() && v->get<std::uint64_t>() <= std::uint64_t(std::numeric_limits<std::int64_t>::max()))
      return static_cast<std::int64_t>(v->get<std::uint64_t>());
    if (v->is_number_integer()) return v->get<std::int64_t>();
    bad(key, "expected an integer, found " + v->dump());
  }
  /// A required integer in [1, INT_MAX].
  int positive_int(const std::string& key) const {
    const auto v = opt_int(key);
    if (!v) bad(key, "missing");
    if (*v < 1 || *v > std::numeric_limits<int>::max()) bad(key, std::to_string(*v) + " is not a positive int");
    return static_cast<int>(*v);
  }
  std::optional<double> opt_number(const std::string& key) const {
    const auto* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_number()) bad(key, "expected a number, found " + v->dump());
    return v->get<double>();
  }
  std::optional<bool> opt_bool(const std::string& key) const {
    const auto* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_boolean()) bad(key, "expected true or false, found " + v->dump());
    return v->get<bool>();
  }
  std::optional<std::string> opt_string(const std::string& key) const {
    const auto* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_string()) bad(key, "expected a string, found " + v->dump());
    return v->get<std::string>();
  }
  /// A nested object's fields (nullopt when absent or null).
  std::optional<JsonFields> opt_object(const std::string& key) const {
    const auto* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_object()) bad(key, "expected an object, found " + v->dump());
    return JsonFields(*v, file_, prefix_ + key + ".");
  }

 private:
  const nlohmann::json& j_;
  std::string file_, prefix_;
};

/// A JSON file; IoError when unreadable, FormatError naming the file when it does not parse.
inline nlohmann::json read_json_file(const std::filesystem::path& file) {
  const std::vector<std::byte> bytes = read_file_bytes(file);
  const auto* first = reinterpret_cast<const char*>(bytes.data());
  try {
    return nlohmann::json::parse(first, first + bytes.size());
  } catch (const nlohmann::json::exception& e) {
    earn::detail::throw_format(file.string(), "json", std::string("does not parse: ") + e.what());
  }
}

/// `text` as a whole decimal int, or nullopt.
inline std::optional<int> parse_int(std::string_view text) {
  int v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty()) return std::nullopt;
  return v;
}

/// The shortest decimal spelling of a float, as a double (1e-5f is written 1e-05, not 9.99999974e-06).
inline double float_for_json(float f) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, f);
  return std::strtod(std::string(buf, r.ptr).c_str(), nullptr);
}

/// The tensors of a model directory, over one file or many shards, each name present exactly once.
class HfTensors {
 public:
  explicit HfTensors(const std::filesystem::path& dir) {
    const auto single = dir / "model.safetensors", index = dir / "model.safetensors.index.json";
    // Non-throwing lookups: a directory name past the file-name limit is an IoError below, not a filesystem_error.
    if (exists_nothrow(single)) {
      where_name_ = single.string();
      files_.push_back(SafetensorsFile::open(single));
      for (const auto& n : files_[0].names()) where_.emplace(n, 0);
    } else if (exists_nothrow(index)) {
      where_name_ = index.string();
      load_index(dir, index);
    } else {
      throw IoError(dir.string() + ": neither model.safetensors nor model.safetensors.index.json found" +
                    (exists_nothrow(dir / "pytorch_model.bin")
                         ? " (pytorch_model.bin is not supported: convert it to safetensors)"
                         : ""));
    }
  }

  bool contains(std::string_view name) const { return where_.find(name) != where_.end(); }
  /// The file that holds `name`; FormatError "tensor missing" naming the file (or index) otherwise.
  const SafetensorsFile& file_of(std::string_view name) {
    auto it = where_.find(name);
    if (it == where_.end()) earn::detail::throw_format(where_name_, std::string(name), "tensor missing");
    used_.insert(it->first);
    return files_[it->second];
  }
  Matrix matrix(const std::string& name, Index rows, Index cols) { return file_of(name).read_matrix(name, rows, cols); }
  Vector vector(const std::string& name, Index n) { return file_of(name).read_vector(name, n); }
  /// Registers [r, dim] when present, else [0, dim].
  Matrix optional_rows(const std::string& name, Index cols) {
    if (!contains(name)) return Matrix(0, cols);
    const SafetensorsFile& f = file_of(name);
    const TensorInfo* t = f.find(name);
    if (t->shape.size() != 2 || t->shape[1] != cols)
      earn::detail::throw_format(f.name(), name,
                                 "shape " + SafetensorsFile::shape_string(t->shape) + ", expected [rows, " +
                                     std::to_string(cols) + "]");
    return f.read_matrix(name, t->shape[0], cols);
  }
  void mark_used(std::string_view name) {
    if (auto it = where_.find(name); it != where_.end()) used_.insert(it->first);
  }
  /// FormatError for the first tensor no field consumed (a stray layer, a bias the architecture lacks).
  void check_all_used() const {
    for (const auto& [name, idx] : where_) {
      if (used_.count(name)) continue;
      if (name.ends_with(".rotary_emb.inv_freq")) continue;  // derived buffer, recomputed
      earn::detail::throw_format(files_[idx].name(), name, "unexpected tensor for this config");
    }
  }
  /// "earn.schedule" from the shards' metadata (all that carry it must agree; only "gist" is defined), or "".
  std::string schedule() const {
    std::string s, from;
    for (const auto& f : files_) {
      auto it = f.metadata().find("earn.schedule");
      if (it == f.metadata().end()) continue;
      if (it->second != "gist")
        earn::detail::throw_format(f.name(), "__metadata__.earn.schedule", "'" + it->second + "' is not gist");
      if (!s.empty() && it->second != s)
        earn::detail::throw_format(f.name(), "__metadata__.earn.schedule", it->second + " disagrees with " + from);
      s = it->second;
      from = f.name();
    }
    return s;
  }
  /// "earn.split_layer" from the shards' metadata (all that carry it must agree), or -1.
  int split_layer() const {
    int k = -1;
    std::string from;
    for (const auto& f : files_) {
      auto it = f.metadata().find("earn.split_layer");
      if (it == f.metadata().end()) continue;
      const auto v = parse_int(it->second);
      if (!v || *v < 0)
        earn::detail::throw_format(f.name(), "__metadata__.earn.split_layer",
                                   "'" + it->second + "' is not a non-negative integer");
      if (k >= 0 && *v != k)
        earn::detail::throw_format(f.name(), "__metadata__.earn.split_layer",
                                   std::to_string(*v) + " disagrees with " + std::to_string(k) + " in " + from);
      k = *v;
      from = f.name();
    }
    return k;
  }
  const std::string& source_name() const { return where_name_; }

 private:
  void load_index(const std::filesystem::path& dir, const std::filesystem::path& index) {
    const std::string iname = index.string();
    const nlohmann::json j = read_json_file(index);
    if (!j.is_object()) earn::detail::throw_format(iname, "json", "is not an object");
    auto wm = j.find("weight_map");
    if (wm == j.end() || !wm->is_object()) earn::detail::throw_format(iname, "weight_map", "missing or not an object");
    std::map<std::string, std::size_t> shard_index;
    std::map<std::string, std::string> listed;  // tensor -> shard
    for (const auto& [tensor, shard_v] : wm->items()) {
      if (!shard_v.is_string()) earn::detail::throw_format(iname, "weight_map." + tensor, "shard is not a string");
      const std::string shard = shard_v.get<std::string>();
      // Shards are plain file names beside the index: a path could read files outside the model directory.
      if (shard.empty() || shard == "." || shard == ".." || shard.find_first_of("/\\") != std::string::npos)
        earn::detail::throw_format(iname, "weight_map." + tensor, "shard '" + shard + "' is not a plain file name");
      if (!shard_index.count(shard)) {
        const auto path = dir / shard;
        std::error_code ec;  // a shard name past the file-name limit is "not found" here, never a filesystem_error
        if (!std::filesystem::is_regular_file(path, ec))
          earn::detail::throw_format(iname, "weight_map." + tensor,
                                     "shard '" + shard + "' not found in " + dir.string() +
                                         (ec ? " (" + ec.message() + ")" : std::string()));
        shard_index.emplace(shard, files_.size());
        files_.push_back(SafetensorsFile::open(path));
      }
      listed.emplace(tensor, shard);
    }
    // Every tensor of every shard is listed, and listed for that shard: no tensor is present twice.
    for (const auto& [shard, idx] : shard_index) {
      for (const auto& n : files_[idx].names()) {
        auto l = listed.find(n);
        if (l == listed.end())
          earn::detail::throw_format(files_[idx].name(), n, "tensor not listed in " + iname);
        if (l->second != shard)
          earn::detail::throw_format(files_[idx].name(), n, "tensor is in this shard, but " + iname + " lists it in '" +
                                                                 l->second + "'");
        where_.emplace(n, idx);
      }
    }
    for (const auto& [tensor, shard] : listed)
      if (!where_.count(tensor))
        earn::detail::throw_format(iname, "weight_map." + tensor, "tensor not found in shard '" + shard + "'");
  }

  std::string where_name_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, std::size_t, std::less<>> where_;
  std::set<std::string, std::less<>> used_;
};

/// bos_token_id (an id or null) and eos_token_id (an id, a list of ids, or null) of a config.json or a
/// generation_config.json, into c where stated. FormatError for other types, ids outside int.
inline void read_special_ids(const JsonFields& f, ModelConfig& c) {
  const auto id = [&](const std::string& key, const nlohmann::json& v) {
    if (!v.is_number_integer() || v.get<std::int64_t>() < 0 || v.get<std::int64_t>() > std::numeric_limits<int>::max())
      f.bad(key, "expected a non-negative token id, found " + v.dump());
    return static_cast<int>(v.get<std::int64_t>());
  };
  if (const auto* b = f.get("bos_token_id")) c.bos_token_id = id("bos_token_id", *b);
  if (const auto* e = f.get("eos_token_id")) {
    c.eos_token_ids.clear();
    if (e->is_array()) {
      if (e->size() > 64) f.bad("eos_token_id", "more than 64 ids");
      for (const auto& x : *e) c.eos_token_ids.push_back(id("eos_token_id", x));
    } else {
      c.eos_token_ids.push_back(id("eos_token_id", *e));
    }
  }
}

}  // namespace detail

/// Parses a config.json document; `file` names it in errors. The result is validated (ConfigError if not).
inline HfConfig parse_hf_config(const nlohmann::json& j, const std::string& file) {
  if (!j.is_object()) earn::detail::throw_format(file, "json", "is not an object");
  const detail::JsonFields f(j, file);
  HfConfig out;

  const auto* arch = f.get("architectures");
  if (!arch || !arch->is_array() || arch->size() != 1 || !(*arch)[0].is_string())
    f.bad("architectures", "expected a list of one architecture name");
  const std::string a = (*arch)[0].get<std::string>();
  std::string model_type;
  if (a == "LlamaForCausalLM") {
    out.architecture = HfArchitecture::kLlama;
    model_type = "llama";
  } else if (a == "Qwen2ForCausalLM") {
    out.architecture = HfArchitecture::kQwen2;
    model_type = "qwen2";
  } else {
    f.unsupported("architectures", "'" + a + "' is not supported (LlamaForCausalLM, Qwen2ForCausalLM are)");
  }
  if (auto mt = f.opt_string("model_type"); mt && *mt != model_type)
    f.unsupported("model_type", "'" + *mt + "' does not match architecture " + a);
  const bool qwen2 = out.architecture == HfArchitecture::kQwen2;

  ModelConfig& c = out.model;
  c.dim = f.positive_int("hidden_size");
  c.hidden_dim = f.positive_int("intermediate_size");
  c.n_layers = f.positive_int("num_hidden_layers");
  c.n_heads = f.positive_int("num_attention_heads");
  if (!f.get("num_key_value_heads") && qwen2)
    f.bad("num_key_value_heads", "missing (Qwen2's transformers default is 32, not num_attention_heads: state it)");
  c.n_kv_heads = f.get("num_key_value_heads") ? f.positive_int("num_key_value_heads") : c.n_heads;
  c.vocab_size = f.positive_int("vocab_size");
  c.max_seq_len = f.positive_int("max_position_embeddings");
  // Numbers the model keeps as float must be finite there: 1e39 is a valid JSON double but would become +inf.
  auto as_float = [&](const std::string& key, double v) {
    if (!(std::fabs(v) <= double(std::numeric_limits<float>::max()))) {
      char text[32];
      std::snprintf(text, sizeof text, "%g", v);
      f.bad(key, std::string(text) + " is outside the float range");
    }
    return static_cast<float>(v);
  };
  c.norm_eps = as_float("rms_norm_eps", f.opt_number("rms_norm_eps").value_or(1e-6));
  c.tied_embeddings = f.opt_bool("tie_word_embeddings").value_or(false);
  c.qkv_bias = qwen2;
  c.rope_style = RopeStyle::kRotateHalf;  // transformers' rotate_half pairs (i, i + head_dim/2)

  if (auto hd = f.opt_int("head_dim"); hd && (c.dim % c.n_heads != 0 || *hd != c.dim / c.n_heads))
    f.unsupported("head_dim", std::to_string(*hd) + " differs from hidden_size / num_attention_heads = " +
                                  std::to_string(c.dim) + " / " + std::to_string(c.n_heads));
  if (auto act = f.opt_string("hidden_act"); act && *act != "silu")
    f.unsupported("hidden_act", "'" + *act + "' is not supported (silu is)");
  if (!qwen2) {
    if (f.opt_bool("attention_bias").value_or(false))
      f.unsupported("attention_bias", "true is not supported (Llama then also biases o_proj)");
    if (f.opt_bool("mlp_bias").value_or(false)) f.unsupported("mlp_bias", "true is not supported");
  } else {
    if (f.opt_bool("use_sliding_window").value_or(false))
      f.unsupported("use_sliding_window", "sliding-window attention is not supported");
    if (const auto* lt = f.get("layer_types")) {
      if (!lt->is_array()) f.bad("layer_types", "expected a list");
      for (const auto& t : *lt)
        if (!t.is_string() || t.get<std::string>() != "full_attention")
          f.unsupported("layer_types", t.dump() + " is not supported (full_attention is)");
    }
  }

  // RoPE: transformers 5.x nests it in rope_parameters, 4.x keeps rope_theta at the top with rope_scaling beside.
  std::optional<double> theta;
  auto check_rope_type = [&](const detail::JsonFields& obj, const std::string& where) {
    for (const char* key : {"rope_type", "type"})
      if (auto t = obj.opt_string(key); t && *t != "default")
        f.unsupported(where + "." + key, "'" + *t + "' RoPE scaling is not supported (only default RoPE is)");
  };
  if (auto rp = f.opt_object("rope_parameters")) {
    check_rope_type(*rp, "rope_parameters");
    theta = rp->opt_number("rope_theta");
    if (!theta) f.bad("rope_parameters.rope_theta", "missing");
    if (auto prf = rp->opt_number("partial_rotary_factor"); prf && *prf != 1.0)
      f.unsupported("rope_parameters.partial_rotary_factor", "partial rotary embeddings are not supported");
  }
  if (auto top = f.opt_number("rope_theta")) {
    if (theta && *theta != *top)
      f.bad("rope_theta", "top-level " + std::to_string(*top) + " disagrees with rope_parameters.rope_theta " +
                              std::to_string(*theta));
    theta = top;
  }
  if (auto rs = f.opt_object("rope_scaling")) check_rope_type(*rs, "rope_scaling");
  if (auto prf = f.opt_number("partial_rotary_factor"); prf && *prf != 1.0)
    f.unsupported("partial_rotary_factor", "partial rotary embeddings are not supported");
  c.rope_theta = as_float("rope_theta", theta.value_or(10000.0));

  detail::read_special_ids(f, c);

  if (auto e = f.opt_object("earn")) {
    if (auto k = e->opt_int("split_layer")) {
      if (*k < 0 || *k > c.n_layers)
        f.bad("earn.split_layer", std::to_string(*k) + " is outside 0.." + std::to_string(c.n_layers));
      out.split_layer = static_cast<int>(*k);
    }
    if (auto sch = e->opt_string("schedule")) {
      if (*sch != "gist") f.bad("earn.schedule", "'" + *sch + "' is not gist");
      out.schedule = *sch;
    }
  }

  try {
    c.validate();
  } catch (const ConfigError& e) {
    throw ConfigError(file + ": " + e.what());
  }
  return out;
}

/// Reads and parses `<dir>/config.json`, then `generation_config.json` beside it when present: its bos_token_id /
/// eos_token_id take precedence, as in transformers' generate.
inline HfConfig read_hf_config(const std::filesystem::path& config_json) {
  HfConfig hc = parse_hf_config(detail::read_json_file(config_json), config_json.string());
  const auto gen = config_json.parent_path() / "generation_config.json";
  if (detail::exists_nothrow(gen)) {
    const nlohmann::json j = detail::read_json_file(gen);
    if (!j.is_object()) earn::detail::throw_format(gen.string(), "json", "is not an object");
    detail::read_special_ids(detail::JsonFields(j, gen.string()), hc.model);
    try {
      hc.model.validate();
    } catch (const ConfigError& e) {
      throw ConfigError(gen.string() + ": " + e.what());
    }
  }
  return hc;
}

/// Loads a Hugging Face model directory (see the header comment for what is read and refused).
inline ModelWeights load_hf(const std::filesystem::path& dir) {
  const HfConfig hc = read_hf_config(dir / "config.json");
  const ModelConfig& c = hc.model;
  detail::HfTensors t(dir);
  ModelWeights w;
  w.config = c;
  const Index qd = Index{c.n_heads} * c.head_dim(), kvd = c.kv_dim();
  w.tok_embeddings = t.matrix("model.embed_tokens.weight", c.vocab_size, c.dim);
  w.layers.resize(static_cast<std::size_t>(c.n_layers));
  for (int i = 0; i < c.n_layers; ++i) {
    LayerWeights& l = w.layers[static_cast<std::size_t>(i)];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    l.attn_norm = t.vector(p + "input_layernorm.weight", c.dim);
    l.wq = t.matrix(p + "self_attn.q_proj.weight", qd, c.dim);
    l.wk = t.matrix(p + "self_attn.k_proj.weight", kvd, c.dim);
    l.wv = t.matrix(p + "self_attn.v_proj.weight", kvd, c.dim);
    if (c.qkv_bias) {
      l.bq = t.vector(p + "self_attn.q_proj.bias", qd);
      l.bk = t.vector(p + "self_attn.k_proj.bias", kvd);
      l.bv = t.vector(p + "self_attn.v_proj.bias", kvd);
    }
    l.wo = t.matrix(p + "self_attn.o_proj.weight", c.dim, qd);
    l.ffn_norm = t.vector(p + "post_attention_layernorm.weight", c.dim);
    l.w1 = t.matrix(p + "mlp.gate_proj.weight", c.hidden_dim, c.dim);
    l.w3 = t.matrix(p + "mlp.up_proj.weight", c.hidden_dim, c.dim);
    l.w2 = t.matrix(p + "mlp.down_proj.weight", c.dim, c.hidden_dim);
  }
  w.final_norm = t.vector("model.norm.weight", c.dim);
  if (c.tied_embeddings)
    t.mark_used("lm_head.weight");  // transformers ties it to the embedding whatever the file holds
  else
    w.lm_head = t.matrix("lm_head.weight", c.vocab_size, c.dim);
  w.registers.prefix = t.optional_rows("earn.prefix_registers", c.dim);
  w.registers.suffix = t.optional_rows("earn.suffix_registers", c.dim);
  t.check_all_used();

  const int meta_k = t.split_layer();
  if (meta_k >= 0 && hc.split_layer >= 0 && meta_k != hc.split_layer)
    earn::detail::throw_format((dir / "config.json").string(), "earn.split_layer",
                               std::to_string(hc.split_layer) + " disagrees with the weights' metadata " +
                                   std::to_string(meta_k));
  w.split_layer = meta_k >= 0 ? meta_k : hc.split_layer;
  const std::string meta_s = t.schedule();
  if (!meta_s.empty() && !hc.schedule.empty() && meta_s != hc.schedule)
    earn::detail::throw_format((dir / "config.json").string(), "earn.schedule",
                               hc.schedule + " disagrees with the weights' metadata " + meta_s);
  w.trained_schedule = meta_s.empty() ? hc.schedule : meta_s;
  try {
    w.validate();
  } catch (const ConfigError& e) {
    throw ConfigError(dir.string() + ": " + e.what());
  }
  return w;
}

/// Writes `w` as a Hugging Face directory: config.json (transformers 5.x style; Qwen2ForCausalLM when the model
/// has q/k/v biases, else LlamaForCausalLM) and model.safetensors in F32 with EARN's registers and split layer.
/// Interleaved-RoPE weights (llama2.c) have the rows of wq / wk (and their biases) permuted per head so that
/// transformers' rotate-half RoPE computes the same attention: pair (2i, 2i+1) becomes (i, i + head_dim/2).
inline void save_hf(const std::filesystem::path& dir, const ModelWeights& w) {
  w.validate();
  const ModelConfig& c = w.config;
  const bool qwen2 = c.qkv_bias;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw IoError(dir.string() + ": cannot create: " + ec.message());

  // Row permutation taking interleaved head layouts to rotate-half ones (identity for rotate-half models).
  const int hd = c.head_dim(), half = hd / 2;
  auto to_rotate_half = [&](const auto& x, int heads) {
    std::decay_t<decltype(x)> y = x;
    if (c.rope_style != RopeStyle::kInterleaved) return y;
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < half; ++i) {
        y.row(Index{h} * hd + i) = x.row(Index{h} * hd + 2 * i);
        y.row(Index{h} * hd + i + half) = x.row(Index{h} * hd + 2 * i + 1);
      }
    return y;
  };

  std::vector<Matrix> mats;  // keeps permuted copies alive while the views below point at them
  std::vector<Vector> vecs;
  mats.reserve(2 * w.layers.size());
  vecs.reserve(2 * w.layers.size());
  std::vector<TensorToWrite> out;
  out.push_back(tensor_to_write("model.embed_tokens.weight", w.tok_embeddings));
  for (std::size_t i = 0; i < w.layers.size(); ++i) {
    const LayerWeights& l = w.layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out.push_back(tensor_to_write(p + "input_layernorm.weight", l.attn_norm));
    mats.push_back(to_rotate_half(l.wq, c.n_heads));
    out.push_back(tensor_to_write(p + "self_attn.q_proj.weight", mats.back()));
    mats.push_back(to_rotate_half(l.wk, c.n_kv_heads));
    out.push_back(tensor_to_write(p + "self_attn.k_proj.weight", mats.back()));
    out.push_back(tensor_to_write(p + "self_attn.v_proj.weight", l.wv));
    if (qwen2) {
      vecs.push_back(to_rotate_half(l.bq, c.n_heads));
      out.push_back(tensor_to_write(p + "self_attn.q_proj.bias", vecs.back()));
      vecs.push_back(to_rotate_half(l.bk, c.n_kv_heads));
      out.push_back(tensor_to_write(p + "self_attn.k_proj.bias", vecs.back()));
      out.push_back(tensor_to_write(p + "self_attn.v_proj.bias", l.bv));
    }
    out.push_back(tensor_to_write(p + "self_attn.o_proj.weight", l.wo));
    out.push_back(tensor_to_write(p + "post_attention_layernorm.weight", l.ffn_norm));
    out.push_back(tensor_to_write(p + "mlp.gate_proj.weight", l.w1));
    out.push_back(tensor_to_write(p + "mlp.up_proj.weight", l.w3));
    out.push_back(tensor_to_write(p + "mlp.down_proj.weight", l.w2));
  }
  out.push_back(tensor_to_write("model.norm.weight", w.final_norm));
  if (!c.tied_embeddings) out.push_back(tensor_to_write("lm_head.weight", w.lm_head));
  if (w.registers.prefix.rows() > 0) out.push_back(tensor_to_write("earn.prefix_registers", w.registers.prefix));
  if (w.registers.suffix.rows() > 0) out.push_back(tensor_to_write("earn.suffix_registers", w.registers.suffix));
  std::map<std::string, std::string> meta = {{"format", "pt"}};
  if (w.split_layer >= 0) meta["earn.split_layer"] = std::to_string(w.split_layer);
  if (!w.trained_schedule.empty()) meta["earn.schedule"] = w.trained_schedule;
  write_safetensors(dir / "model.safetensors", out, meta);

  nlohmann::ordered_json j;
  j["architectures"] = {qwen2 ? "Qwen2ForCausalLM" : "LlamaForCausalLM"};
  j["model_type"] = qwen2 ? "qwen2" : "llama";
  j["hidden_size"] = c.dim;
  j["intermediate_size"] = c.hidden_dim;
  j["num_hidden_layers"] = c.n_layers;
  j["num_attention_heads"] = c.n_heads;
  j["num_key_value_heads"] = c.n_kv_heads;
  j["head_dim"] = c.head_dim();
  j["vocab_size"] = c.vocab_size;
  j["max_position_embeddings"] = c.max_seq_len;
  j["rms_norm_eps"] = detail::float_for_json(c.norm_eps);
  j["tie_word_embeddings"] = c.tied_embeddings;
  j["hidden_act"] = "silu";
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", detail::float_for_json(c.rope_theta)}};
  if (qwen2)
    j["use_sliding_window"] = false;
  else
    j["attention_bias"] = false;
  j["dtype"] = "float32";
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1)
    j["eos_token_id"] = c.eos_token_ids[0];
  else if (!c.eos_token_ids.empty())
    j["eos_token_id"] = c.eos_token_ids;
  std::ofstream cfg(dir / "config.json", std::ios::trunc);
  if (!cfg) throw IoError((dir / "config.json").string() + ": cannot open for writing");
  cfg << j.dump(2) << "\n";
  if (!cfg) throw IoError((dir / "config.json").string() + ": write failed");
}

}  // namespace earn::io
