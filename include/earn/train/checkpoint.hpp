// earn/train/checkpoint.hpp - training checkpoints: the model as a Hugging Face directory, AdamW's state and the
// trainer's position, written so that a crash at any moment leaves the previous checkpoint whole.
//
// One checkpoint is a directory of four files:
//   config.json, model.safetensors  io::save_hf's model directory, so io::load_hf and examples/evaluate read it as
//                                   any model (registers as earn.prefix/suffix_registers, split layer in metadata)
//   optimizer.safetensors           AdamW's moments in F32 by earn tensor name (BasicModelWeights::tensors()), as
//                                   torch names them: "exp_avg.<name>", "exp_avg_sq.<name>"; __metadata__ holds
//                                   "earn.optimizer": "adamw", "earn.adamw_steps": "<t>", "earn.adamw": "<JSON>"
//                                   (every AdamWOptions field, freezing included)
//   trainer.json                    {"format": "earn.trainer", "version": 1, "step", "cursor", "best_metric",
//                                    "best_step", "schedule", "model", "extra"}; "model" records the config and the
//                                   register counts, so a config.json from another model is refused on load
// Scalar: fp32 only (io::save_hf writes F32, and a bitwise round trip needs the stored type); the functions are
// templates so that another T stops the build with one static_assert.
// load_checkpoint reads all of it back bitwise (weights, moments, step, cursor, every double). A model with
// interleaved RoPE (llama2.c) is stored in Hugging Face's rotate-half row order by save_hf; its moments stay in
// earn's order and load_checkpoint permutes wq / wk (and biases) back, so a resumed run continues bit for bit.
//
// Crash safety of one directory (save_checkpoint(dir)): every file is written into a fresh sibling
// `.tmp-<16 hex>-<name>` and flushed (fsync on POSIX), then renamed to `<name>`; rename is atomic within a
// filesystem, so `<name>` is always either the previous checkpoint or the new one, whole. Replacing an existing
// `<name>` takes two renames (old -> `.old-<hex>-<name>`, new -> `<name>`); should a crash fall between them,
// load_checkpoint reads the `.old-` sibling, and the next save renames it back before anything else. Leftover
// `.tmp-` and `.old-` siblings are removed by the next save of that name. One writer per directory.
//
// A run (CheckpointRun) keeps versioned directories `<run>/step-000120/` (6+ digits, one per global step) and the
// pointer files `latest` and `best`, each one line naming a step directory, replaced by write-temp + rename. A save
// writes the step directory, then moves `latest` to it (and `best`, when TrainerState::best_step is the step
// saved), then prunes: the `keep_last` highest steps stay, and whatever `latest` and `best` name, whatever their
// age. A crash before the pointer moves leaves `latest` on the previous checkpoint; the next save of that step
// replaces the orphan as above. A process reading a live run (evaluation) wants keep_last >= 2, so the step it
// resolved is not pruned under it by the next save.
//
// \code
//   earn::train::CheckpointRun run("runs/beauty-earn", /*keep_last=*/3);
//   run.save(weights, adamw, state);                          // runs/beauty-earn/step-000120, latest -> it
//   auto ck = run.load_latest();                              // Checkpoint<float>
//   earn::train::AdamW<float> opt = ck.optimizer();           // moments and step count restored
//   batcher.seek(ck.trainer.cursor);                          // the same batches from here on
// \endcode
#pragma once

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "earn/core/config.hpp"
#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"
#include "earn/io/hf.hpp"
#include "earn/io/safetensors.hpp"
#include "earn/model/weights.hpp"
#include "earn/train/data.hpp"
#include "earn/train/optimizer.hpp"

#if __has_include(<fcntl.h>) && __has_include(<unistd.h>)
#include <cerrno>
#include <fcntl.h>
#include <unistd.h>
#define EARN_CHECKPOINT_FSYNC 1
#else
#define EARN_CHECKPOINT_FSYNC 0
#endif

namespace earn::train {

/// What a training loop needs to continue besides the weights and the optimizer.
struct TrainerState {
  std::int64_t step = 0;              ///< global (optimizer) steps taken
  DataCursor cursor;                  ///< where the data order continues
  std::optional<double> best_metric;  ///< best validation metric so far (finite), none before the first evaluation
  std::int64_t best_step = -1;        ///< the step that reached best_metric; -1 for none
  LrSchedule schedule;                ///< the learning-rate schedule the run follows
  nlohmann::json extra = nlohmann::json::object();  ///< free-form object the trainer may fill (settings, notes)
};

/// A checkpoint read back: model, AdamW state and trainer state.
template <class T>
struct Checkpoint {
  BasicModelWeights<T> weights;         ///< the model, in earn's layout (interleaved RoPE rows restored)
  AdamWOptions adamw;                   ///< hyper-parameters, parameter groups and freezing
  BasicModelWeights<T> first_moment;    ///< AdamW m, shaped as `weights`
  BasicModelWeights<T> second_moment;   ///< AdamW v, shaped as `weights`
  std::int64_t optimizer_steps = 0;     ///< AdamW's t (bias correction)
  TrainerState trainer;                 ///< step, data cursor, best metric, schedule, extra

  /// An AdamW over `weights` holding this checkpoint's options, moments and step count.
  AdamW<T> optimizer() const {
    AdamW<T> opt(weights, adamw);
    opt.first_moment() = first_moment;
    opt.second_moment() = second_moment;
    opt.set_steps(optimizer_steps);
    return opt;
  }
};

namespace detail {

inline constexpr const char* kCheckpointFiles[] = {"config.json", "model.safetensors", "optimizer.safetensors",
                                                   "trainer.json"};
inline constexpr std::string_view kTmpPrefix = ".tmp-", kOldPrefix = ".old-", kTrashPrefix = ".trash-";
inline constexpr std::size_t kTagLen = 16;

template <class T>
void require_fp32() {
  static_assert(std::is_same_v<T, float>,
                "earn: checkpoints hold fp32 (io::save_hf writes F32): save weights.cast<float>() with an "
                "AdamW<float>, load with load_checkpoint<float>");
}

// Flushes a file's or a directory's contents to the device: without it a rename can reach the disk before the
// data it names, and a power cut would leave a whole-looking directory of empty files.
#if EARN_CHECKPOINT_FSYNC
inline void sync_path(const std::filesystem::path& p, bool directory) {
  const int fd = ::open(p.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd < 0) throw IoError(p.string() + ": cannot open to flush: " + std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some filesystems cannot sync a directory (EINVAL); the rename is still atomic there.
  if (rc != 0 && !(directory && (err == EINVAL || err == EBADF)))
    throw IoError(p.string() + ": fsync failed: " + std::strerror(err));
}
#else
inline void sync_path(const std::filesystem::path&, bool) {}  // no portable flush: atomic renames still hold
#endif

// 16 hex digits unlikely to repeat across processes and calls (clock, counter, an address), through splitmix64.
inline std::string scratch_tag() {
  static std::atomic<std::uint64_t> counter{0};
  const auto now = static_cast<std::uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
  const auto tick = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  Rng rng(now ^ (tick << 1) ^ (counter.fetch_add(1) * 0x9E3779B97F4A7C15ull) ^
          static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(&counter)));
  const std::uint64_t v = rng.next_u64();
  std::string s(kTagLen, '0');
  for (std::size_t i = 0; i < kTagLen; ++i) s[i] = "0123456789abcdef"[(v >> (4 * (kTagLen - 1 - i))) & 0xF];
  return s;
}

// A sibling `<prefix><tag>-<name>` of `parent` that does not exist yet.
inline std::filesystem::path fresh_sibling(const std::filesystem::path& parent, std::string_view prefix,
                                           const std::string& name) {
  for (;;) {
    auto p = parent / (std::string(prefix) + scratch_tag() + "-" + name);
    std::error_code ec;
    if (!std::filesystem::exists(p, ec)) return p;
  }
}

// The name a scratch entry `<prefix><16 hex>-<name>` belongs to, or nullopt for anything else.
inline std::optional<std::string> scratch_owner(std::string_view file, std::string_view prefix) {
  if (file.size() <= prefix.size() + kTagLen + 1 || file.substr(0, prefix.size()) != prefix) return std::nullopt;
  const std::string_view tag = file.substr(prefix.size(), kTagLen);
  for (char c : tag)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return std::nullopt;
  if (file[prefix.size() + kTagLen] != '-') return std::nullopt;
  return std::string(file.substr(prefix.size() + kTagLen + 1));
}

inline void rename_or_throw(const std::filesystem::path& from, const std::filesystem::path& to) {
  std::error_code ec;
  std::filesystem::rename(from, to, ec);
  if (ec) throw IoError(from.string() + ": cannot rename to " + to.string() + ": " + ec.message());
}

inline void remove_quietly(const std::filesystem::path& p) {
  std::error_code ec;
  std::filesystem::remove_all(p, ec);  // leftovers only: a failure here costs disk space, never a checkpoint
}

// Leftovers of interrupted saves in `parent`, for entry `name` only (or for every name when null): an `.old-`
// copy whose entry is missing is renamed back (a crash fell between a replacement's two renames); every other
// `.tmp-`, `.old-` and `.trash-` entry is removed.
inline void clean_leftovers(const std::filesystem::path& parent, const std::string* name) {
  std::error_code ec;
  std::vector<std::filesystem::path> entries;
  for (auto it = std::filesystem::directory_iterator(parent, ec); !ec && it != std::filesystem::directory_iterator();
       it.increment(ec))
    entries.push_back(it->path());
  for (const auto& p : entries) {
    const std::string file = p.filename().string();
    for (std::string_view prefix : {kTmpPrefix, kOldPrefix, kTrashPrefix}) {
      const auto owner = scratch_owner(file, prefix);
      if (!owner || (name && *owner != *name)) continue;
      std::error_code e2;
      if (prefix == kOldPrefix && !std::filesystem::exists(parent / *owner, e2))
        rename_or_throw(p, parent / *owner);
      else
        remove_quietly(p);
    }
  }
}

// `dir` as an absolute path with a file name (a trailing slash dropped).
inline std::filesystem::path normal_dir(const std::filesystem::path& dir) {
  std::filesystem::path p = std::filesystem::absolute(dir).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();
  return p;
}

// Where checkpoint `dir` is readable: itself, or the `.old-` copy a replacement interrupted between its renames.
inline std::filesystem::path readable_dir(const std::filesystem::path& dir) {
  const std::filesystem::path d = normal_dir(dir);
  std::error_code ec;
  if (std::filesystem::is_directory(d, ec)) return d;
  const std::string name = d.filename().string();
  for (auto it = std::filesystem::directory_iterator(d.parent_path(), ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    const auto owner = scratch_owner(it->path().filename().string(), kOldPrefix);
    std::error_code e2;
    if (owner && *owner == name && it->is_directory(e2)) return it->path();
  }
  throw IoError(d.string() + ": no checkpoint directory here");
}

// Writes `text` to `file` and flushes it.
inline void write_text_file(const std::filesystem::path& file, const std::string& text) {
  {
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    if (!out) throw IoError(file.string() + ": cannot open for writing");
    out << text;
    out.flush();
    if (!out) throw IoError(file.string() + ": write failed");
  }
  sync_path(file, false);
}

// Replaces the small file `parent/name` by `text` atomically: write a temp sibling, flush, rename over.
inline void replace_file(const std::filesystem::path& parent, const std::string& name, const std::string& text) {
  const std::filesystem::path tmp = fresh_sibling(parent, kTmpPrefix, name);
  try {
    write_text_file(tmp, text);
    rename_or_throw(tmp, parent / name);
  } catch (...) {
    remove_quietly(tmp);
    throw;
  }
  sync_path(parent, true);
}

// Shape a moment is stored with: [n] for RMSNorm gains and biases (vectors), [rows, cols] for the rest.
template <class T>
std::vector<std::int64_t> stored_shape(const TensorView<T>& t) {
  if (t.role == TensorRole::kNorm || t.role == TensorRole::kBias) return {t.size};
  return {t.rows, t.cols};
}

// Throws ConfigError unless `moment` lists the tensors of `w` (same names, same sizes, same order).
template <class T>
void require_moment(const BasicModelWeights<T>& w, const BasicModelWeights<T>& moment, const char* which) {
  const auto a = w.tensors();
  const auto b = moment.tensors();
  if (a.size() != b.size())
    throw ConfigError(std::string("save_checkpoint: AdamW ") + which + " has " + std::to_string(b.size()) +
                      " tensors, the model " + std::to_string(a.size()) + " (an optimizer of another model?)");
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].name != b[i].name || a[i].rows != b[i].rows || a[i].cols != b[i].cols)
      throw ConfigError(std::string("save_checkpoint: AdamW ") + which + " tensor " + b[i].name + " [" +
                        std::to_string(b[i].rows) + ", " + std::to_string(b[i].cols) + "] does not match model "
                        "tensor " + a[i].name + " [" + std::to_string(a[i].rows) + ", " + std::to_string(a[i].cols) +
                        "]");
}

inline nlohmann::ordered_json adamw_json(const AdamWOptions& o) {
  nlohmann::ordered_json j;
  j["beta1"] = o.beta1;
  j["beta2"] = o.beta2;
  j["eps"] = o.eps;
  j["weight_decay"] = o.weight_decay;
  j["decay_norms"] = o.decay_norms;
  j["decay_biases"] = o.decay_biases;
  j["decay_registers"] = o.decay_registers;
  j["max_grad_norm"] = o.max_grad_norm;
  j["freeze"] = {{"all_but_registers", o.freeze.all_but_registers},
                 {"layers", o.freeze.layers},
                 {"names", o.freeze.names}};
  return j;
}

// A required field of a JSON object, through hf.hpp's typed accessor (errors name the file and the field).
struct Fields {
  io::detail::JsonFields f;
  double number(const std::string& k) const {
    if (auto v = f.opt_number(k)) return *v;
    f.bad(k, "missing");
  }
  bool boolean(const std::string& k) const {
    if (auto v = f.opt_bool(k)) return *v;
    f.bad(k, "missing");
  }
  std::int64_t integer(const std::string& k) const {
    if (auto v = f.opt_int(k)) return *v;
    f.bad(k, "missing");
  }
  int small_int(const std::string& k, int lo) const {
    const std::int64_t v = integer(k);
    if (v < lo || v > std::numeric_limits<int>::max()) f.bad(k, std::to_string(v) + " is out of range");
    return static_cast<int>(v);
  }
  std::string string(const std::string& k) const {
    if (auto v = f.opt_string(k)) return *v;
    f.bad(k, "missing");
  }
  Fields object(const std::string& k) const {
    if (auto v = f.opt_object(k)) return Fields{*v};
    f.bad(k, "missing");
  }
};

inline AdamWOptions adamw_from_json(const nlohmann::json& j, const std::string& file) {
  if (!j.is_object()) earn::detail::throw_format(file, "__metadata__.earn.adamw", "is not a JSON object");
  const Fields f{io::detail::JsonFields(j, file, "__metadata__.earn.adamw.")};
  AdamWOptions o;
  o.beta1 = f.number("beta1");
  o.beta2 = f.number("beta2");
  o.eps = f.number("eps");
  o.weight_decay = f.number("weight_decay");
  o.decay_norms = f.boolean("decay_norms");
  o.decay_biases = f.boolean("decay_biases");
  o.decay_registers = f.boolean("decay_registers");
  o.max_grad_norm = f.number("max_grad_norm");
  const Fields fr = f.object("freeze");
  o.freeze.all_but_registers = fr.boolean("all_but_registers");
  const nlohmann::json& jf = j.at("freeze");
  try {
    o.freeze.layers = jf.at("layers").get<std::vector<int>>();
    o.freeze.names = jf.at("names").get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception& e) {
    earn::detail::throw_format(file, "__metadata__.earn.adamw.freeze", std::string("layers / names: ") + e.what());
  }
  return o;
}

// Every field of ModelConfig under its trainer.json key: one list for writing, reading and comparing, so a field
// added to the config cannot be forgotten by one of the three.
template <class C, class F>
void visit_config(C& c, F&& f) {
  f("dim", c.dim);
  f("hidden_dim", c.hidden_dim);
  f("n_layers", c.n_layers);
  f("n_heads", c.n_heads);
  f("n_kv_heads", c.n_kv_heads);
  f("vocab_size", c.vocab_size);
  f("max_seq_len", c.max_seq_len);
  f("rope_theta", c.rope_theta);
  f("norm_eps", c.norm_eps);
  f("tied_embeddings", c.tied_embeddings);
  f("qkv_bias", c.qkv_bias);
  f("rope_style", c.rope_style);
}

inline nlohmann::ordered_json config_json(const ModelConfig& c) {
  nlohmann::ordered_json j;
  visit_config(c, [&](const char* key, const auto& v) {
    using V = std::decay_t<decltype(v)>;
    if constexpr (std::is_same_v<V, RopeStyle>)
      j[key] = v == RopeStyle::kInterleaved ? "interleaved" : "rotate_half";
    else if constexpr (std::is_same_v<V, float>)
      j[key] = double(v);  // float -> double is exact, and back
    else
      j[key] = v;
  });
  return j;
}

inline nlohmann::ordered_json model_json(const ModelConfig& c, Index prefix_registers, Index suffix_registers,
                                         int split_layer) {
  nlohmann::ordered_json j = config_json(c);
  j["prefix_registers"] = prefix_registers;
  j["suffix_registers"] = suffix_registers;
  j["split_layer"] = split_layer;
  return j;
}

// What trainer.json says of the model.
struct ModelRecord {
  ModelConfig config;
  int prefix_registers = 0, suffix_registers = 0, split_layer = -1;
};

inline ModelRecord model_from_json(const Fields& f) {
  ModelRecord r;
  visit_config(r.config, [&](const char* key, auto& v) {
    using V = std::decay_t<decltype(v)>;
    if constexpr (std::is_same_v<V, RopeStyle>) {
      const std::string style = f.string(key);
      if (style != "interleaved" && style != "rotate_half")
        f.f.bad(key, "'" + style + "' is neither interleaved nor rotate_half");
      v = style == "interleaved" ? RopeStyle::kInterleaved : RopeStyle::kRotateHalf;
    } else if constexpr (std::is_same_v<V, float>) {
      v = static_cast<float>(f.number(key));
    } else if constexpr (std::is_same_v<V, bool>) {
      v = f.boolean(key);
    } else {
      v = f.small_int(key, 1);
    }
  });
  r.prefix_registers = f.small_int("prefix_registers", 0);
  r.suffix_registers = f.small_int("suffix_registers", 0);
  r.split_layer = f.small_int("split_layer", -1);
  return r;
}

inline nlohmann::ordered_json trainer_json(const TrainerState& s, const nlohmann::ordered_json& model) {
  nlohmann::ordered_json j;
  j["format"] = "earn.trainer";
  j["version"] = 1;
  j["step"] = s.step;
  j["cursor"] = {{"epoch", s.cursor.epoch},
                 {"position", s.cursor.position},
                 {"seed", s.cursor.seed},
                 {"examples", s.cursor.examples}};
  j["best_metric"] = s.best_metric ? nlohmann::ordered_json(*s.best_metric) : nlohmann::ordered_json(nullptr);
  j["best_step"] = s.best_step;
  j["schedule"] = {{"lr", s.schedule.lr},
                   {"warmup_ratio", s.schedule.warmup_ratio},
                   {"min_ratio", s.schedule.min_ratio},
                   {"total_steps", s.schedule.total_steps}};
  j["model"] = model;
  j["extra"] = nlohmann::ordered_json::parse(s.extra.dump());  // keep the trainer's own key order as dumped
  return j;
}

inline TrainerState trainer_from_json(const nlohmann::json& j, const std::string& file, ModelRecord& model) {
  if (!j.is_object()) earn::detail::throw_format(file, "json", "is not an object");
  const Fields f{io::detail::JsonFields(j, file)};
  if (f.string("format") != "earn.trainer") f.f.bad("format", "is not \"earn.trainer\"");
  if (f.integer("version") != 1) f.f.bad("version", "only version 1 is known");
  TrainerState s;
  s.step = f.integer("step");
  if (s.step < 0) f.f.bad("step", "is negative");
  const Fields c = f.object("cursor");
  s.cursor.epoch = c.integer("epoch");
  s.cursor.position = c.integer("position");
  s.cursor.examples = c.integer("examples");
  const nlohmann::json& seed = j.at("cursor").contains("seed") ? j.at("cursor").at("seed") : nlohmann::json();
  if (!seed.is_number_unsigned()) c.f.bad("seed", "missing or not an unsigned 64-bit integer");
  s.cursor.seed = seed.get<std::uint64_t>();
  if (s.cursor.epoch < 0 || s.cursor.position < 0 || s.cursor.examples < 0)
    f.f.bad("cursor", "epoch, position and examples must be non-negative");
  s.best_metric = f.f.opt_number("best_metric");  // null: no evaluation yet
  s.best_step = f.integer("best_step");
  if (s.best_step < -1) f.f.bad("best_step", "is below -1 (none)");
  const Fields sc = f.object("schedule");
  s.schedule.lr = sc.number("lr");
  s.schedule.warmup_ratio = sc.number("warmup_ratio");
  s.schedule.min_ratio = sc.number("min_ratio");
  s.schedule.total_steps = sc.integer("total_steps");
  model = model_from_json(f.object("model"));
  const auto* extra = f.f.get("extra");
  if (extra && !extra->is_object()) f.f.bad("extra", "is not an object");
  s.extra = extra ? *extra : nlohmann::json::object();
  return s;
}

// Undoes save_hf's interleaved -> rotate-half row permutation of each head of wq / wk (and their biases):
// HF row h*hd + i holds pair member 2i, row h*hd + i + hd/2 member 2i + 1.
template <class M>
M from_rotate_half(const M& y, int heads, int head_dim) {
  M x = y;
  const int half = head_dim / 2;
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < half; ++i) {
      x.row(Index{h} * head_dim + 2 * i) = y.row(Index{h} * head_dim + i);
      x.row(Index{h} * head_dim + 2 * i + 1) = y.row(Index{h} * head_dim + i + half);
    }
  return x;
}

inline void to_interleaved(ModelWeights& w) {
  const ModelConfig& c = w.config;
  for (auto& l : w.layers) {
    l.wq = from_rotate_half(l.wq, c.n_heads, c.head_dim());
    l.wk = from_rotate_half(l.wk, c.n_kv_heads, c.head_dim());
    if (l.bq.size()) l.bq = from_rotate_half(l.bq, c.n_heads, c.head_dim());
    if (l.bk.size()) l.bk = from_rotate_half(l.bk, c.n_kv_heads, c.head_dim());
  }
  w.config.rope_style = RopeStyle::kInterleaved;
}

// Fills `m` (shaped as the model) with the moments named `prefix` + tensor name; names and shapes must agree.
inline void read_moment(const io::SafetensorsFile& f, const std::string& prefix, ModelWeights& m,
                        std::size_t& used) {
  for (auto& t : m.tensors()) {
    const std::string key = prefix + t.name;
    const io::TensorInfo* info = f.find(key);
    if (!info)
      throw ConfigError(f.name() + ": " + key + ": missing: the optimizer state has no moment for model tensor " +
                        t.name + " (a checkpoint of another model?)");
    if (info->dtype != io::Dtype::kF32)
      earn::detail::throw_format(f.name(), key, "dtype " + std::string(io::dtype_name(info->dtype)) +
                                                    ", moments are stored as F32");
    const auto want = stored_shape(t);
    if (info->shape != want)
      throw ConfigError(f.name() + ": " + key + ": shape " + io::SafetensorsFile::shape_string(info->shape) +
                        " disagrees with the model's " + io::SafetensorsFile::shape_string(want));
    const std::vector<float> v = f.read_floats(*info);
    std::copy(v.begin(), v.end(), t.data);
    ++used;
  }
}

inline std::int64_t parse_steps(const io::SafetensorsFile& f) {
  const auto it = f.metadata().find("earn.adamw_steps");
  if (it == f.metadata().end()) earn::detail::throw_format(f.name(), "__metadata__.earn.adamw_steps", "missing");
  std::int64_t v = -1;
  const std::string& s = it->second;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || v < 0)
    earn::detail::throw_format(f.name(), "__metadata__.earn.adamw_steps", "'" + s + "' is not a step count");
  return v;
}

}  // namespace detail

/// "" when `a` and `b` describe the same model, else the first difference ("dim 16 vs 32").
inline std::string config_difference(const ModelConfig& a, const ModelConfig& b) {
  const auto ja = detail::config_json(a), jb = detail::config_json(b);
  for (const auto& [key, value] : ja.items())
    if (value != jb.at(key)) return key + " " + value.dump() + " vs " + jb.at(key).dump();
  return "";
}

/// Writes checkpoint directory `dir` (see the file comment) crash-safely, replacing any previous one of that name.
/// ConfigError, before anything is written, when the optimizer's moments do not match the weights' tensors, the
/// weights fail validate(), the step is negative, the best metric is not finite, or `extra` is not an object;
/// IoError when the disk refuses.
template <class T>
void save_checkpoint(const std::filesystem::path& dir, const BasicModelWeights<T>& w, const AdamW<T>& opt,
                     const TrainerState& state) {
  detail::require_fp32<T>();
  w.validate();
  detail::require_moment(w, opt.first_moment(), "first moment");
  detail::require_moment(w, opt.second_moment(), "second moment");
  if (state.step < 0) throw ConfigError("save_checkpoint: negative step " + std::to_string(state.step));
  if (state.best_metric && !std::isfinite(*state.best_metric))
    throw ConfigError("save_checkpoint: best metric is not finite");
  if (!state.extra.is_object()) throw ConfigError("save_checkpoint: TrainerState::extra must be a JSON object");

  const std::filesystem::path target = detail::normal_dir(dir);
  const std::filesystem::path parent = target.parent_path();
  const std::string name = target.filename().string();
  std::error_code ec;
  std::filesystem::create_directories(parent, ec);
  if (ec) throw IoError(parent.string() + ": cannot create: " + ec.message());
  detail::clean_leftovers(parent, &name);

  const std::filesystem::path tmp = detail::fresh_sibling(parent, detail::kTmpPrefix, name);
  try {
    io::save_hf(tmp, w);
    std::vector<io::TensorToWrite> moments;
    for (const auto& [prefix, m] : {std::pair{"exp_avg.", &opt.first_moment()}, {"exp_avg_sq.", &opt.second_moment()}})
      for (const auto& t : m->tensors())
        moments.push_back({prefix + t.name, detail::stored_shape(t),
                           std::span<const float>(t.data, static_cast<std::size_t>(t.size))});
    const std::map<std::string, std::string> meta = {{"format", "pt"},
                                                     {"earn.optimizer", "adamw"},
                                                     {"earn.adamw_steps", std::to_string(opt.steps())},
                                                     {"earn.adamw", detail::adamw_json(opt.options()).dump()}};
    io::write_safetensors(tmp / "optimizer.safetensors", moments, meta);
    const auto model = detail::model_json(w.config, w.registers.prefix.rows(), w.registers.suffix.rows(),
                                          w.split_layer);
    detail::write_text_file(tmp / "trainer.json", detail::trainer_json(state, model).dump(2) + "\n");
    for (const char* file : detail::kCheckpointFiles) detail::sync_path(tmp / file, false);
    detail::sync_path(tmp, true);
  } catch (...) {
    detail::remove_quietly(tmp);
    throw;
  }

  // Swap in: the previous checkpoint steps aside under `.old-` (readable there) until the new one holds the name.
  std::optional<std::filesystem::path> old;
  if (std::filesystem::exists(target, ec)) {
    old = detail::fresh_sibling(parent, detail::kOldPrefix, name);
    detail::rename_or_throw(target, *old);
  }
  try {
    detail::rename_or_throw(tmp, target);
  } catch (...) {
    if (old) detail::rename_or_throw(*old, target);
    detail::remove_quietly(tmp);
    throw;
  }
  detail::sync_path(parent, true);
  if (old) detail::remove_quietly(*old);
}

/// Reads checkpoint directory `dir` back, bitwise. IoError for a missing directory or file; FormatError for a
/// malformed or truncated file; ConfigError when the moments' names or shapes disagree with the model, or
/// config.json with trainer.json's record of the model.
template <class T = float>
Checkpoint<T> load_checkpoint(const std::filesystem::path& dir) {
  detail::require_fp32<T>();
  const std::filesystem::path d = detail::readable_dir(dir);
  std::error_code ec;
  for (const char* file : detail::kCheckpointFiles)
    if (!std::filesystem::is_regular_file(d / file, ec)) {
      const bool run = std::filesystem::exists(d / "latest", ec);
      throw IoError((d / file).string() + ": missing, so " + d.string() + " is not a complete checkpoint" +
                    (run ? " (it is a run directory: use CheckpointRun::load_latest)" : ""));
    }

  Checkpoint<T> ck;
  detail::ModelRecord rec;
  const std::string trainer_file = (d / "trainer.json").string();
  ck.trainer = detail::trainer_from_json(io::detail::read_json_file(d / "trainer.json"), trainer_file, rec);

  ck.weights = io::load_hf(d);
  if (rec.config.rope_style == RopeStyle::kInterleaved) detail::to_interleaved(ck.weights);
  std::string diff = config_difference(ck.weights.config, rec.config);
  if (diff.empty() && ck.weights.registers.prefix.rows() != rec.prefix_registers)
    diff = "prefix registers " + std::to_string(ck.weights.registers.prefix.rows()) + " vs " +
           std::to_string(rec.prefix_registers);
  if (diff.empty() && ck.weights.registers.suffix.rows() != rec.suffix_registers)
    diff = "suffix registers " + std::to_string(ck.weights.registers.suffix.rows()) + " vs " +
           std::to_string(rec.suffix_registers);
  if (diff.empty() && ck.weights.split_layer != rec.split_layer)
    diff = "split layer " + std::to_string(ck.weights.split_layer) + " vs " + std::to_string(rec.split_layer);
  if (!diff.empty())
    throw ConfigError(d.string() + ": the model (config.json, model.safetensors) disagrees with trainer.json's "
                      "record of it: " + diff);

  const io::SafetensorsFile f = io::SafetensorsFile::open(d / "optimizer.safetensors");
  const auto kind = f.metadata().find("earn.optimizer");
  if (kind == f.metadata().end() || kind->second != "adamw")
    earn::detail::throw_format(f.name(), "__metadata__.earn.optimizer", "missing or not \"adamw\"");
  ck.optimizer_steps = detail::parse_steps(f);
  const auto opts = f.metadata().find("earn.adamw");
  if (opts == f.metadata().end()) earn::detail::throw_format(f.name(), "__metadata__.earn.adamw", "missing");
  nlohmann::json oj;
  try {
    oj = nlohmann::json::parse(opts->second);
  } catch (const nlohmann::json::exception& e) {
    earn::detail::throw_format(f.name(), "__metadata__.earn.adamw", std::string("does not parse: ") + e.what());
  }
  ck.adamw = detail::adamw_from_json(oj, f.name());
  ck.adamw.validate();

  ck.first_moment = ck.weights.zeros_like();
  ck.second_moment = ck.weights.zeros_like();
  std::size_t used = 0;
  detail::read_moment(f, "exp_avg.", ck.first_moment, used);
  detail::read_moment(f, "exp_avg_sq.", ck.second_moment, used);
  if (used != f.size()) {
    const auto views = ck.first_moment.tensors();
    for (const std::string& n : f.names()) {
      bool known = false;
      for (const auto& t : views) known = known || n == "exp_avg." + t.name || n == "exp_avg_sq." + t.name;
      if (!known)
        throw ConfigError(f.name() + ": " + n + ": names no tensor of the model (a checkpoint of another model?)");
    }
  }
  return ck;
}

/// A training run's checkpoints: step directories, the `latest` and `best` pointers, pruning (file comment).
class CheckpointRun {
 public:
  /// Checkpoints under `root` (created on the first save), keeping the `keep_last` newest steps plus the ones
  /// `latest` and `best` name. ConfigError for keep_last < 1.
  explicit CheckpointRun(std::filesystem::path root, int keep_last = 3)
      : root_(detail::normal_dir(root)), keep_last_(keep_last) {
    if (keep_last < 1) throw ConfigError("checkpoint run: keep_last must be >= 1");
  }

  const std::filesystem::path& root() const { return root_; }
  int keep_last() const { return keep_last_; }

  /// "step-000120": the directory name of a global step (at least 6 digits).
  static std::string step_name(std::int64_t step) {
    if (step < 0) throw ConfigError("checkpoint run: negative step " + std::to_string(step));
    std::string digits = std::to_string(step);
    if (digits.size() < 6) digits.insert(0, 6 - digits.size(), '0');
    return "step-" + digits;
  }
  /// The step a directory name stands for, or nullopt for any other name.
  static std::optional<std::int64_t> parse_step_name(std::string_view name) {
    if (name.size() < 11 || name.substr(0, 5) != "step-") return std::nullopt;
    std::int64_t v = 0;
    const auto [end, ec] = std::from_chars(name.data() + 5, name.data() + name.size(), v);
    if (ec != std::errc() || end != name.data() + name.size() || v < 0 || step_name(v) != name) return std::nullopt;
    return v;
  }

  /// Steps with a directory, ascending (each whole: only a finished save gives a step directory its name).
  std::vector<std::int64_t> steps() const {
    std::vector<std::int64_t> out;
    std::error_code ec;
    for (auto it = std::filesystem::directory_iterator(root_, ec); !ec && it != std::filesystem::directory_iterator();
         it.increment(ec)) {
      std::error_code e2;
      if (auto s = parse_step_name(it->path().filename().string()); s && it->is_directory(e2)) out.push_back(*s);
    }
    std::sort(out.begin(), out.end());
    return out;
  }

  /// The directory `latest` names; nullopt before the first save. FormatError for a malformed pointer.
  std::optional<std::filesystem::path> latest() const { return pointer("latest"); }
  /// The directory `best` names; nullopt before a save at a TrainerState::best_step.
  std::optional<std::filesystem::path> best() const { return pointer("best"); }

  /// Saves `<root>/step-NNNNNN` for state.step, moves `latest` (and `best` when state.best_step == state.step) to
  /// it, then prunes. Returns the directory.
  template <class T>
  std::filesystem::path save(const BasicModelWeights<T>& w, const AdamW<T>& opt, const TrainerState& state) {
    const std::string name = step_name(state.step);
    std::error_code ec;
    std::filesystem::create_directories(root_, ec);
    if (ec) throw IoError(root_.string() + ": cannot create: " + ec.message());
    detail::clean_leftovers(root_, nullptr);
    save_checkpoint(root_ / name, w, opt, state);
    detail::replace_file(root_, "latest", name + "\n");
    if (state.best_step == state.step) detail::replace_file(root_, "best", name + "\n");
    prune();
    return root_ / name;
  }

  /// The checkpoint `latest` names. IoError when the run has none.
  template <class T = float>
  Checkpoint<T> load_latest() const {
    const auto d = latest();
    if (!d) throw IoError((root_ / "latest").string() + ": missing: the run has no checkpoint yet");
    return load_checkpoint<T>(*d);
  }
  /// The checkpoint `best` names. IoError when none was marked best.
  template <class T = float>
  Checkpoint<T> load_best() const {
    const auto d = best();
    if (!d) throw IoError((root_ / "best").string() + ": missing: no checkpoint was saved at its best step");
    return load_checkpoint<T>(*d);
  }

  /// Removes step directories beyond the keep_last newest, sparing those `latest` and `best` name. save() calls it.
  void prune() const {
    std::vector<std::int64_t> s = steps();
    std::vector<std::string> spared;
    for (const char* p : {"latest", "best"})
      if (auto d = pointer(p)) spared.push_back(d->filename().string());
    const std::size_t keep = static_cast<std::size_t>(keep_last_);
    for (std::size_t i = 0; i + keep < s.size(); ++i) {
      const std::string name = step_name(s[i]);
      if (std::find(spared.begin(), spared.end(), name) != spared.end()) continue;
      // Renamed first, so a crash mid-removal leaves a `.trash-` entry, never a half-deleted step directory.
      const auto trash = detail::fresh_sibling(root_, detail::kTrashPrefix, name);
      detail::rename_or_throw(root_ / name, trash);
      detail::remove_quietly(trash);
    }
  }

 private:
  std::optional<std::filesystem::path> pointer(const char* file) const {
    const std::filesystem::path p = root_ / file;
    std::error_code ec;
    if (!std::filesystem::exists(p, ec)) return std::nullopt;
    const std::vector<std::byte> bytes = io::detail::read_file_bytes(p);
    std::string name(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    while (!name.empty() && (name.back() == '\n' || name.back() == '\r' || name.back() == ' ')) name.pop_back();
    if (!parse_step_name(name))
      earn::detail::throw_format(p.string(), "pointer", "'" + name + "' is not a step directory name");
    return root_ / name;
  }

  std::filesystem::path root_;
  int keep_last_;
};

}  // namespace earn::train
