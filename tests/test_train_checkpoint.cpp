// Training checkpoints: a bitwise round trip of weights (with registers), AdamW state and trainer state; a real
// training run (CPU forward/backward, AdamW, Batcher) stopped at a checkpoint and resumed equals the uninterrupted
// one bit for bit; simulated crashes (leftover temp directories, an interrupted replacement, a step saved but not
// yet pointed to) that leave the previous checkpoint loadable; typed errors for missing, truncated and mismatched
// files; the run's pointers and pruning; io::load_hf reading a checkpoint directory.
#include <doctest/doctest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <unistd.h>

#include "earn/backend/cpu/train.hpp"
#include "earn/io/hf.hpp"
#include "earn/io/safetensors.hpp"
#include "earn/model/weights.hpp"
#include "earn/plan/forward.hpp"
#include "earn/schedule/presets.hpp"
#include "earn/train/checkpoint.hpp"
#include "earn/train/data.hpp"
#include "earn/train/optimizer.hpp"
#include "support.hpp"

using namespace earn;
using namespace earn::train;
namespace fs = std::filesystem;
using earn::test::TempDir;

namespace {

enum class Family { kLlamaTied, kQwen2, kInterleaved };

// A small random model with registers and a recorded split layer, in one of three families.
ModelWeights small_model(Family fam, std::uint64_t seed = 1) {
  ModelConfig c;
  c.dim = 16;
  c.hidden_dim = 24;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 37;
  c.max_seq_len = 64;
  c.norm_eps = 1e-6f;
  c.rope_theta = 5e5f;
  c.tied_embeddings = fam == Family::kLlamaTied;
  c.qkv_bias = fam == Family::kQwen2;
  c.rope_style = fam == Family::kInterleaved ? RopeStyle::kInterleaved : RopeStyle::kRotateHalf;
  ModelWeights w = random_weights(c, {.seed = seed,
                                      .prefix_registers = fam == Family::kQwen2 ? 2 : 1,
                                      .suffix_registers = fam == Family::kLlamaTied ? 2 : 1});
  w.split_layer = fam == Family::kQwen2 ? -1 : 1;
  return w;
}

// Gradients of the model's shapes filled from `seed`.
ModelWeights fake_grads(const ModelWeights& w, std::uint64_t seed) {
  ModelWeights g = w.zeros_like();
  Rng rng(seed);
  for (auto& t : g.tensors())
    for (Index i = 0; i < t.size; ++i) t.data[i] = rng.symmetric(0.5f);
  return g;
}

AdamWOptions unusual_adamw() {
  AdamWOptions o;
  o.beta1 = 0.85;
  o.beta2 = 0.995;
  o.eps = 1e-7;
  o.weight_decay = 0.05;
  o.decay_norms = true;
  o.max_grad_norm = 0.7;
  o.freeze.layers = {2};
  o.freeze.names = {"final_norm"};
  return o;
}

// `steps` AdamW steps of fake gradients on `w` at the schedule's learning rates.
void fake_steps(ModelWeights& w, AdamW<float>& opt, const LrSchedule& sched, int steps, std::uint64_t seed) {
  for (int s = 0; s < steps; ++s) {
    ModelWeights g = fake_grads(w, seed + std::uint64_t(s));
    opt.step(w, g, sched.at(opt.steps()));
  }
}

TrainerState some_state(std::int64_t step) {
  TrainerState st;
  st.step = step;
  Batcher b(103, {.micro_batch = 8, .seed = 0xFEEDFACECAFEBEEFull});  // a seed above 2^63: JSON keeps it unsigned
  for (int i = 0; i < 17; ++i) b.next();
  st.cursor = b.cursor();
  st.best_metric = 0.012345678901234567;
  st.best_step = step > 1 ? step - 1 : -1;
  st.schedule = {.lr = 1e-3, .warmup_ratio = 0.02, .min_ratio = 0.1, .total_steps = 1000};
  st.extra = {{"note", "fake"}, {"metrics", {0.1, 1.0 / 3.0}}, {"nested", {{"k", 4}}}};
  return st;
}

bool same_bits(const ModelWeights& a, const ModelWeights& b) {
  const auto x = a.tensors(), y = b.tensors();
  if (x.size() != y.size()) return false;
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (x[i].name != y[i].name || x[i].rows != y[i].rows || x[i].cols != y[i].cols) return false;
    if (std::memcmp(x[i].data, y[i].data, sizeof(float) * std::size_t(x[i].size)) != 0) return false;
  }
  return config_difference(a.config, b.config).empty() && a.split_layer == b.split_layer &&
         a.registers.prefix.rows() == b.registers.prefix.rows() &&
         a.registers.suffix.rows() == b.registers.suffix.rows();
}

void check_same_state(const TrainerState& a, const TrainerState& b) {
  CHECK(a.step == b.step);
  CHECK(a.cursor == b.cursor);
  CHECK(a.best_metric == b.best_metric);
  CHECK(a.best_step == b.best_step);
  CHECK(a.schedule.lr == b.schedule.lr);
  CHECK(a.schedule.warmup_ratio == b.schedule.warmup_ratio);
  CHECK(a.schedule.min_ratio == b.schedule.min_ratio);
  CHECK(a.schedule.total_steps == b.schedule.total_steps);
  CHECK(a.extra == b.extra);
}

std::int64_t saved_step(const fs::path& dir) { return load_checkpoint(dir).trainer.step; }

// Entries of `dir` whose names start with '.': scratch left by interrupted saves.
std::vector<std::string> scratch(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().front() == '.') out.push_back(e.path().filename().string());
  return out;
}

// A saved checkpoint to corrupt: model, optimizer after 2 steps, state at step 2.
struct Saved {
  TempDir tmp;
  fs::path dir = tmp.path / "ck";
  ModelWeights w = small_model(Family::kLlamaTied);
  AdamW<float> opt{w, unusual_adamw()};
  Saved() {
    fake_steps(w, opt, some_state(2).schedule, 2, 9);
    save_checkpoint(dir, w, opt, some_state(2));
  }
  // Rewrites optimizer.safetensors after `edit` changed its tensors / metadata.
  void rewrite_optimizer(const std::function<void(std::vector<io::TensorToWrite>&, std::vector<std::vector<float>>&,
                                                  std::map<std::string, std::string>&)>& edit) const {
    const auto f = io::SafetensorsFile::open(dir / "optimizer.safetensors");
    std::vector<std::vector<float>> data;
    std::vector<io::TensorToWrite> ts;
    for (const std::string& n : f.names()) data.push_back(f.read_floats(*f.find(n)));
    std::size_t i = 0;
    for (const std::string& n : f.names()) ts.push_back({n, f.find(n)->shape, data[i++]});
    auto meta = f.metadata();
    edit(ts, data, meta);
    io::write_safetensors(dir / "optimizer.safetensors", ts, meta);
  }
  void edit_trainer(const std::function<void(nlohmann::json&)>& edit) const {
    std::ifstream in(dir / "trainer.json");
    nlohmann::json j = nlohmann::json::parse(in);
    edit(j);
    std::ofstream(dir / "trainer.json", std::ios::trunc) << j.dump(2);
  }
};

template <class E>
void expect_error(const fs::path& dir, const std::string& fragment) {
  try {
    (void)load_checkpoint(dir);
    FAIL_CHECK("no error; expected one mentioning " << fragment);
  } catch (const E& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find(fragment) != std::string::npos);
  } catch (const Error& e) {
    FAIL_CHECK("wrong error type: " << e.what());
  }
}

}  // namespace

TEST_CASE("checkpoint round trip: weights, moments, step, cursor and trainer state come back bitwise") {
  for (Family fam : {Family::kLlamaTied, Family::kQwen2, Family::kInterleaved}) {
    INFO("family " << int(fam));
    TempDir tmp;
    ModelWeights w = small_model(fam);
    AdamW<float> opt(w, unusual_adamw());
    const TrainerState st = some_state(3);
    fake_steps(w, opt, st.schedule, 3, 100);
    const fs::path dir = tmp.path / "ck";
    save_checkpoint(dir, w, opt, st);
    CHECK(scratch(tmp.path).empty());

    const Checkpoint<float> ck = load_checkpoint(dir);
    CHECK(same_bits(ck.weights, w));
    CHECK(same_bits(ck.first_moment, opt.first_moment()));
    CHECK(same_bits(ck.second_moment, opt.second_moment()));
    CHECK(ck.optimizer_steps == 3);
    check_same_state(ck.trainer, st);
    const AdamWOptions& a = ck.adamw;
    const AdamWOptions b = unusual_adamw();
    CHECK((a.beta1 == b.beta1 && a.beta2 == b.beta2 && a.eps == b.eps && a.weight_decay == b.weight_decay));
    CHECK((a.decay_norms == b.decay_norms && a.decay_biases == b.decay_biases &&
           a.decay_registers == b.decay_registers && a.max_grad_norm == b.max_grad_norm));
    CHECK((a.freeze.all_but_registers == b.freeze.all_but_registers && a.freeze.layers == b.freeze.layers &&
           a.freeze.names == b.freeze.names));

    // Resuming continues the uninterrupted run bit for bit: two more steps on each side.
    AdamW<float> resumed = ck.optimizer();
    ModelWeights w2 = ck.weights;
    fake_steps(w, opt, st.schedule, 2, 200);
    fake_steps(w2, resumed, st.schedule, 2, 200);
    CHECK(same_bits(w2, w));
    CHECK(same_bits(resumed.second_moment(), opt.second_moment()));
    // ...and so does the data order.
    Batcher straight(103, {.micro_batch = 8, .seed = st.cursor.seed});
    for (int i = 0; i < 17; ++i) straight.next();
    Batcher again(103, {.micro_batch = 8});
    again.seek(ck.trainer.cursor);
    for (int i = 0; i < 30; ++i) CHECK(again.next().indices == straight.next().indices);

    // The directory is a Hugging Face model for io::load_hf (examples/evaluate): registers and split layer kept.
    const ModelWeights hf = io::load_hf(dir);
    CHECK(hf.split_layer == ck.weights.split_layer);
    CHECK(hf.registers.prefix == ck.weights.registers.prefix);
    CHECK(hf.registers.suffix == ck.weights.registers.suffix);
    if (fam != Family::kInterleaved) {
      CHECK(same_bits(hf, ck.weights));
    } else {
      // Stored in Hugging Face's rotate-half row order; the checkpoint loader undoes it.
      CHECK(hf.config.rope_style == RopeStyle::kRotateHalf);
      CHECK(ck.weights.config.rope_style == RopeStyle::kInterleaved);
      CHECK(!(hf.layers[0].wq == ck.weights.layers[0].wq));
      CHECK(hf.layers[0].wv == ck.weights.layers[0].wv);
    }
  }
}

TEST_CASE("save_checkpoint refuses inconsistent input before writing anything") {
  TempDir tmp;
  const ModelWeights w = small_model(Family::kQwen2);
  const AdamW<float> opt(w, {});
  const fs::path dir = tmp.path / "ck";
  const ModelWeights other = small_model(Family::kLlamaTied);
  CHECK_THROWS_AS(save_checkpoint(dir, w, AdamW<float>(other, {}), some_state(1)), ConfigError);
  CHECK_THROWS_AS(save_checkpoint(dir, w, AdamW<float>(), some_state(1)), ConfigError);
  TrainerState st = some_state(1);
  st.step = -1;
  CHECK_THROWS_AS(save_checkpoint(dir, w, opt, st), ConfigError);
  st = some_state(1);
  st.best_metric = std::nan("");
  CHECK_THROWS_AS(save_checkpoint(dir, w, opt, st), ConfigError);
  st = some_state(1);
  st.extra = nlohmann::json::array({1, 2});
  CHECK_THROWS_AS(save_checkpoint(dir, w, opt, st), ConfigError);
  CHECK(fs::is_empty(tmp.path));
  // No best metric yet is fine, and comes back as none.
  st = some_state(1);
  st.best_metric.reset();
  save_checkpoint(dir, w, opt, st);
  CHECK(!load_checkpoint(dir).trainer.best_metric);
}

TEST_CASE("crash safety: a leftover or interrupted save leaves the previous checkpoint whole and loadable") {
  TempDir tmp;
  ModelWeights w = small_model(Family::kLlamaTied);
  AdamW<float> opt(w, {});
  const fs::path dir = tmp.path / "ck";
  save_checkpoint(dir, w, opt, some_state(1));

  SUBCASE("a newer save died while writing its temp directory") {
    const fs::path partial = tmp.path / ".tmp-0123456789abcdef-ck";
    fs::create_directories(partial);
    std::ofstream(partial / "config.json") << "{\"archi";
    CHECK(saved_step(dir) == 1);
    save_checkpoint(dir, w, opt, some_state(2));  // the next save clears the leftover
    CHECK(saved_step(dir) == 2);
    CHECK(scratch(tmp.path).empty());
  }
  SUBCASE("a replacement died between its two renames") {
    // The previous checkpoint stepped aside, the new one never took the name.
    fs::rename(dir, tmp.path / ".old-00000000000000aa-ck");
    fs::create_directories(tmp.path / ".tmp-00000000000000bb-ck");
    CHECK(!fs::exists(dir));
    CHECK(saved_step(dir) == 1);  // read from where it stepped aside
    save_checkpoint(dir, w, opt, some_state(2));
    CHECK(saved_step(dir) == 2);
    CHECK(scratch(tmp.path).empty());
  }
  SUBCASE("a replacement died after the new checkpoint took the name, before the old copy was removed") {
    fs::copy(dir, tmp.path / ".old-00000000000000cc-ck", fs::copy_options::recursive);
    save_checkpoint(tmp.path / "sibling", w, opt, some_state(7));  // another name's save leaves ck's scratch alone
    CHECK(scratch(tmp.path).size() == 1u);
    CHECK(saved_step(dir) == 1);
    save_checkpoint(dir, w, opt, some_state(3));
    CHECK(saved_step(dir) == 3);
    CHECK(scratch(tmp.path).empty());
  }
  SUBCASE("a trailing slash names the same checkpoint") {
    save_checkpoint(dir.string() + "/", w, opt, some_state(4));
    CHECK(saved_step(dir.string() + "/") == 4);
    CHECK(scratch(tmp.path).empty());
  }
}

TEST_CASE("load_checkpoint refuses missing, truncated and mismatched files with typed errors") {
  SUBCASE("missing directory or file: IoError") {
    Saved s;
    expect_error<IoError>(s.tmp.path / "nope", "no checkpoint");
    for (const char* file : {"config.json", "model.safetensors", "optimizer.safetensors", "trainer.json"}) {
      INFO(std::string(file));
      const fs::path moved = s.tmp.path / "moved";
      fs::rename(s.dir / file, moved);
      expect_error<IoError>(s.dir, file);
      fs::rename(moved, s.dir / file);
    }
    CHECK(saved_step(s.dir) == 2);
  }
  SUBCASE("truncated files: FormatError naming the file") {
    Saved s;
    for (const char* file : {"config.json", "model.safetensors", "optimizer.safetensors", "trainer.json"}) {
      const fs::path p = s.dir / file;
      std::ifstream in(p, std::ios::binary);
      const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      for (std::size_t keep : {std::size_t(0), std::size_t(3), bytes.size() / 2, bytes.size() - 2}) {
        INFO(std::string(file) << " cut to " << keep << " of " << bytes.size() << " bytes");
        std::ofstream(p, std::ios::binary | std::ios::trunc).write(bytes.data(), std::streamsize(keep));
        expect_error<FormatError>(s.dir, file);
      }
      std::ofstream(p, std::ios::binary | std::ios::trunc).write(bytes.data(), std::streamsize(bytes.size()));
    }
    CHECK(saved_step(s.dir) == 2);
  }
  SUBCASE("moments whose names or shapes disagree with the model: ConfigError") {
    Saved s;
    s.rewrite_optimizer([](auto& ts, auto&, auto&) { ts.erase(ts.begin() + 3); });
    expect_error<ConfigError>(s.dir, "missing");
  }
  SUBCASE("a moment of the wrong shape") {
    Saved s;
    s.rewrite_optimizer([](auto& ts, auto&, auto&) {
      for (auto& t : ts)
        if (t.name == "exp_avg.layers.1.wk") t.shape = {t.shape[1], t.shape[0]};
    });
    expect_error<ConfigError>(s.dir, "exp_avg.layers.1.wk");
  }
  SUBCASE("a moment the model has no tensor for") {
    Saved s;
    static const std::vector<float> extra(16, 0.0f);
    s.rewrite_optimizer([](auto& ts, auto&, auto&) { ts.push_back({"exp_avg.layers.9.wq", {16}, extra}); });
    expect_error<ConfigError>(s.dir, "exp_avg.layers.9.wq");
  }
  SUBCASE("optimizer metadata: missing step count or unknown optimizer is FormatError") {
    Saved s;
    s.rewrite_optimizer([](auto&, auto&, auto& meta) { meta.erase("earn.adamw_steps"); });
    expect_error<FormatError>(s.dir, "earn.adamw_steps");
    s.rewrite_optimizer([](auto&, auto&, auto& meta) {
      meta["earn.adamw_steps"] = "2";
      meta["earn.optimizer"] = "sgd";
    });
    expect_error<FormatError>(s.dir, "earn.optimizer");
    s.rewrite_optimizer([](auto&, auto&, auto& meta) {
      meta["earn.optimizer"] = "adamw";
      meta["earn.adamw"] = "{\"beta1\": 0.9}";
    });
    expect_error<FormatError>(s.dir, "earn.adamw.beta2");
  }
  SUBCASE("model and trainer.json disagree: ConfigError") {
    Saved s;
    s.edit_trainer([](nlohmann::json& j) { j["model"]["vocab_size"] = 38; });
    expect_error<ConfigError>(s.dir, "vocab_size 37 vs 38");
    s.edit_trainer([](nlohmann::json& j) {
      j["model"]["vocab_size"] = 37;
      j["model"]["suffix_registers"] = 1;
    });
    expect_error<ConfigError>(s.dir, "suffix registers");
    s.edit_trainer([](nlohmann::json& j) { j["model"]["suffix_registers"] = 2; });
    CHECK(saved_step(s.dir) == 2);
  }
  SUBCASE("config.json and model.safetensors of another model") {
    Saved s;
    ModelWeights bigger = small_model(Family::kLlamaTied);
    bigger.config.max_seq_len = 128;  // same tensors, another config
    io::save_hf(s.dir, bigger);
    expect_error<ConfigError>(s.dir, "max_seq_len 128 vs 64");
    io::save_hf(s.dir, small_model(Family::kQwen2));  // other tensors: biases, untied head
    expect_error<ConfigError>(s.dir, "trainer.json");
  }
  SUBCASE("malformed trainer.json fields: FormatError naming the field") {
    Saved s;
    s.edit_trainer([](nlohmann::json& j) { j["step"] = "three"; });
    expect_error<FormatError>(s.dir, "step");
    s.edit_trainer([](nlohmann::json& j) {
      j["step"] = 2;
      j["cursor"]["seed"] = -5;
    });
    expect_error<FormatError>(s.dir, "seed");
    s.edit_trainer([](nlohmann::json& j) {
      j["cursor"]["seed"] = 1;
      j["extra"] = 3;
    });
    expect_error<FormatError>(s.dir, "extra");
  }
}

TEST_CASE("CheckpointRun: step directories, latest and best pointers, pruning, crashes between them") {
  TempDir tmp;
  CheckpointRun run(tmp.path / "run", /*keep_last=*/2);
  CHECK(!run.latest());
  CHECK_THROWS_AS(run.load_latest(), IoError);
  CHECK_THROWS_AS(CheckpointRun(tmp.path, 0), ConfigError);
  CHECK(CheckpointRun::step_name(120) == "step-000120");
  CHECK(CheckpointRun::step_name(1234567) == "step-1234567");
  CHECK(CheckpointRun::parse_step_name("step-000120") == 120);
  CHECK(!CheckpointRun::parse_step_name("step-120"));
  CHECK(!CheckpointRun::parse_step_name("step-0001234"));
  CHECK(!CheckpointRun::parse_step_name("step-00012a"));

  ModelWeights w = small_model(Family::kQwen2);
  AdamW<float> opt(w, {});
  auto state = [](std::int64_t step, std::int64_t best) {
    TrainerState st = some_state(step);
    st.best_step = best;
    return st;
  };
  for (std::int64_t step : {10, 20, 30, 40}) run.save(w, opt, state(step, step >= 20 ? 20 : -1));
  CHECK(run.steps() == std::vector<std::int64_t>{20, 30, 40});  // 10 pruned; 20 kept as best
  CHECK(run.latest()->filename() == "step-000040");
  CHECK(run.best()->filename() == "step-000020");
  CHECK(run.load_latest().trainer.step == 40);
  CHECK(run.load_best().trainer.step == 20);
  run.save(w, opt, state(50, 50));
  CHECK(run.steps() == std::vector<std::int64_t>{40, 50});
  CHECK(run.best()->filename() == "step-000050");
  CHECK(scratch(run.root()).empty());
  CHECK(io::load_hf(*run.latest()).config.qkv_bias);  // evaluate reads a step directory as any model

  // A save that died while writing step 60, and one that finished step 60 but died before moving `latest`.
  fs::create_directories(run.root() / ".tmp-0123456789abcdef-step-000060");
  std::ofstream(run.root() / ".tmp-fedcba9876543210-latest") << "step-0000";
  CHECK(run.load_latest().trainer.step == 50);
  save_checkpoint(run.root() / "step-000060", w, opt, state(60, 50));
  CHECK(run.load_latest().trainer.step == 50);
  // The resumed run saves step 60 again: the orphan is replaced, `latest` moves, leftovers go.
  run.save(w, opt, state(60, 50));
  CHECK(run.load_latest().trainer.step == 60);
  CHECK(run.steps() == std::vector<std::int64_t>{50, 60});
  CHECK(scratch(run.root()).empty());

  // A pointer naming anything but a step directory is refused.
  std::ofstream(run.root() / "latest", std::ios::trunc) << "../../etc\n";
  CHECK_THROWS_AS(run.latest(), FormatError);
}

namespace {

// Examples of random tokens: prompts of 1-12 tokens, answers of 4, all inside `vocab`.
std::vector<Example> random_examples(int n, int vocab, std::uint64_t seed) {
  Rng rng(seed);
  std::vector<Example> ex(static_cast<std::size_t>(n));
  for (Example& e : ex) {
    e.prompt.resize(1 + uniform_below(rng, 12));
    for (int& t : e.prompt) t = int(uniform_below(rng, std::uint64_t(vocab)));
    for (int& t : e.answer) t = int(uniform_below(rng, std::uint64_t(vocab)));
  }
  return ex;
}

// `steps` real training steps (EARN k = 1 forward and backward, AdamW) over the batcher's next micro-batches.
void train_steps(ModelWeights& w, AdamW<float>& opt, Batcher& batcher, const std::vector<Example>& ex,
                 const LrSchedule& sched, TrainerState& st, int steps) {
  const EarnSchedule schedule{1};
  for (int i = 0; i < steps; ++i) {
    const TeacherBatch tb = teacher_batch(ex, batcher.next().indices);
    const auto fp = plan::plan_forward(schedule, w.config.n_layers, int(w.registers.prefix.rows()),
                                       int(w.registers.suffix.rows()), std::span<const plan::Sequence>(tb.sequences));
    cpu::TrainTape<float> tape;
    ModelWeights grad = w.zeros_like();
    (void)cpu::train_forward(w, schedule, fp, tb.targets, double(tb.targets.size()), tape);
    cpu::train_backward(w, schedule, fp, tape, grad);
    opt.step(w, grad, sched.at(st.step));
    ++st.step;
    st.cursor = batcher.cursor();
  }
}

}  // namespace

TEST_CASE("a run stopped at a checkpoint and resumed equals the uninterrupted run, bit for bit") {
  TempDir tmp;
  const ModelWeights init = small_model(Family::kLlamaTied, 5);
  const std::vector<Example> ex = random_examples(29, init.config.vocab_size, 17);
  const BatcherOptions bopt{.micro_batch = 4, .seed = 99};  // 8 batches an epoch: the runs cross epochs
  const LrSchedule sched{.lr = 1e-2, .warmup_ratio = 0.1, .total_steps = 20};

  ModelWeights w_straight = init;
  AdamW<float> opt_straight(w_straight, {});
  Batcher b_straight(ex.size(), bopt);
  TrainerState st_straight;
  train_steps(w_straight, opt_straight, b_straight, ex, sched, st_straight, 11);

  CheckpointRun run(tmp.path / "run", 2);
  {
    ModelWeights w = init;
    AdamW<float> opt(w, {});
    Batcher b(ex.size(), bopt);
    TrainerState st;
    st.schedule = sched;
    train_steps(w, opt, b, ex, sched, st, 5);
    run.save(w, opt, st);
  }  // the process ends: nothing survives but the checkpoint
  const Checkpoint<float> ck = run.load_latest();
  ModelWeights w = ck.weights;
  AdamW<float> opt = ck.optimizer();
  Batcher b(ex.size(), bopt);
  b.seek(ck.trainer.cursor);
  TrainerState st = ck.trainer;
  train_steps(w, opt, b, ex, ck.trainer.schedule, st, 6);

  CHECK(st.step == st_straight.step);
  CHECK(st.cursor == st_straight.cursor);
  CHECK(opt.steps() == opt_straight.steps());
  CHECK(same_bits(w, w_straight));
  CHECK(same_bits(opt.first_moment(), opt_straight.first_moment()));
  CHECK(same_bits(opt.second_moment(), opt_straight.second_moment()));
  CHECK(!same_bits(w, init));  // it did train
}
