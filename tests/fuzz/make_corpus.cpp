// make_corpus: seed corpora for earn's fuzz harnesses, cut at run time from the real files in ../shared/data and the
// repository's Hugging Face fixtures (nothing derived from the shared data is committed).
//   make_corpus <shared data dir> <out dir>     writes <out>/{safetensors,llama2c,tokenizer,dataset,hf}/seed_*
// Seeds are small (a few KB): libFuzzer mutates faster and its default max_len follows the largest seed.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "earn/io/bytes.hpp"
#include "earn/io/llama2c.hpp"
#include "earn/io/safetensors.hpp"
#include "earn/rec/dataset.hpp"
#include "fuzz_support.hpp"

namespace fs = std::filesystem;
using earn::Index;
using earn::Matrix;
using earn::Vector;

namespace {

fs::path out_root;

void write_seed(const std::string& harness, const std::string& name, std::string_view bytes) {
  fs::create_directories(out_root / harness);
  std::ofstream out(out_root / harness / ("seed_" + name), std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw earn::IoError((out_root / harness / name).string() + ": write failed");
}

template <class T>
void put(std::string& s, T v) {
  char raw[sizeof(T)];
  std::memcpy(raw, &v, sizeof(T));  // little-endian host, as both formats
  s.append(raw, sizeof(T));
}

// F16 by round-to-nearest of the float's mantissa (seeds only: the values are small normals).
std::uint16_t to_f16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const int exp = int((u >> 23) & 0xFF) - 127 + 15;
  if (exp <= 0) return static_cast<std::uint16_t>(sign);
  if (exp >= 31) return static_cast<std::uint16_t>(sign | 0x7C00u);
  return static_cast<std::uint16_t>(sign | std::uint32_t(exp) << 10 | ((u >> 13) & 0x3FFu));
}
std::uint16_t to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<std::uint16_t>(u >> 16);
}

// A safetensors file of 16-bit tensors (earn's writer only writes F32).
std::string safetensors16(const std::vector<std::pair<std::string, Matrix>>& tensors, const char* dtype,
                          std::uint16_t (*conv)(float)) {
  nlohmann::ordered_json header;
  std::string data;
  for (const auto& [name, m] : tensors) {
    const std::size_t begin = data.size();
    for (Index i = 0; i < m.size(); ++i) put(data, conv(m.data()[i]));
    header[name] = {{"dtype", dtype}, {"shape", {m.rows(), m.cols()}}, {"data_offsets", {begin, data.size()}}};
  }
  const std::string h = header.dump();
  std::string out;
  put(out, std::uint64_t(h.size()));
  return out + h + data;
}

std::string as_string(const std::vector<std::byte>& b) { return {reinterpret_cast<const char*>(b.data()), b.size()}; }

void safetensors_seeds(const earn::ModelWeights& w) {
  const Matrix emb = w.tok_embeddings.topRows(6), wq = w.layers[0].wq.topLeftCorner(4, 16);
  const Vector norm = w.final_norm;
  const earn::io::TensorToWrite t[] = {earn::io::tensor_to_write("model.embed_tokens.weight", emb),
                                       earn::io::tensor_to_write("model.norm.weight", norm),
                                       earn::io::tensor_to_write("earn.prefix_registers", wq)};
  const std::vector<std::pair<std::string, Matrix>> m = {{"emb", emb}, {"wq", wq}};
  for (const auto& [name, seed] :
       {std::pair{"f32", as_string(earn::io::safetensors_bytes(t, {{"earn.split_layer", "2"}}))},
        std::pair{"f32_one", as_string(earn::io::safetensors_bytes(std::span(t, 1)))},
        std::pair{"f16", safetensors16(m, "F16", to_f16)}, std::pair{"bf16", safetensors16(m, "BF16", to_bf16)}}) {
    const auto* b = reinterpret_cast<const std::byte*>(seed.data());
    (void)earn::io::SafetensorsFile::from_bytes(name, {b, b + seed.size()});
    write_seed("safetensors", name, seed);
  }
}

// A llama2.c checkpoint of the given shape whose every tensor is the top-left corner of the real one.
std::string llama2c_seed(const earn::ModelWeights& w, int dim, int hidden, int layers, int heads, int kv_heads,
                         int vocab, int seq, bool tied) {
  std::string s;
  for (int v : {dim, hidden, layers, heads, kv_heads, tied ? vocab : -vocab, seq}) put(s, std::int32_t(v));
  const int hd = dim / heads, kvd = kv_heads * hd;
  auto mat = [&](const Matrix& m, int rows, int cols) {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) put(s, m(r % m.rows(), c % m.cols()));
  };
  auto vec = [&](const Vector& v, int n) {
    for (int i = 0; i < n; ++i) put(s, v[i % v.size()]);
  };
  auto stacked = [&](auto&& one) {
    for (int l = 0; l < layers; ++l) one(w.layers[std::size_t(l) % w.layers.size()]);
  };
  mat(w.tok_embeddings, vocab, dim);
  stacked([&](const earn::LayerWeights& l) { vec(l.attn_norm, dim); });
  stacked([&](const earn::LayerWeights& l) { mat(l.wq, dim, dim); });
  stacked([&](const earn::LayerWeights& l) { mat(l.wk, kvd, dim); });
  stacked([&](const earn::LayerWeights& l) { mat(l.wv, kvd, dim); });
  stacked([&](const earn::LayerWeights& l) { mat(l.wo, dim, dim); });
  stacked([&](const earn::LayerWeights& l) { vec(l.ffn_norm, dim); });
  stacked([&](const earn::LayerWeights& l) { mat(l.w1, hidden, dim); });
  stacked([&](const earn::LayerWeights& l) { mat(l.w2, dim, hidden); });
  stacked([&](const earn::LayerWeights& l) { mat(l.w3, hidden, dim); });
  vec(w.final_norm, dim);
  for (int i = 0; i < 2 * seq * hd / 2; ++i) put(s, 0.5f);  // legacy RoPE tables, skipped by the loader
  if (!tied) mat(w.tok_embeddings, vocab, dim);
  return s;
}

void tokenizer_seeds(const fs::path& data) {
  const std::string tok512 = earn::io::detail::read_file_text(data / "llama2c/tok512.bin");
  write_seed("tokenizer", "tok512", std::string(1, '\0') + tok512);
  // The Llama-2 vocabulary cut after its first 600 tokens (at a token boundary: a valid file of 600 tokens).
  const std::string big = earn::io::detail::read_file_text(data / "llama2c/tokenizer.bin");
  std::size_t at = 4;
  for (int i = 0; i < 600 && at + 8 <= big.size(); ++i) {
    std::int32_t len;
    std::memcpy(&len, big.data() + at + 4, 4);
    at += 8 + std::size_t(len);
  }
  write_seed("tokenizer", "llama2_600", std::string(1, '\0') + big.substr(0, at));
  // Texts: the prompts llama2.c's test.c encodes (C literals unescaped as far as they use \" and \\) and a story.
  std::ifstream in(data / "llama2c/tokenizer_bin_expected_ids.txt");
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] != '"') continue;
    std::string text;
    for (std::size_t i = 1; i < line.size() && line[i] != '"'; ++i) text += line[i] == '\\' ? line[++i] : line[i];
    write_seed("tokenizer", "text" + std::to_string(n++), "\x01" + text);
  }
  write_seed("tokenizer", "story",
             "\x01" + earn::io::detail::read_file_text(data / "llama2c/expected_stories260K_t0_n200.txt"));
}

// The first `users` users of the real Amazon Beauty files, items renumbered 1..M in order of appearance, joined as
// the dataset harness reads them: train NUL valid NUL test NUL codes.
std::string dataset_seed(const fs::path& dir, int users) {
  std::map<long, long> renumber;
  std::vector<std::string> files;
  for (const char* name : {"sequential_train.txt", "sequential_valid.txt", "sequential_test.txt"}) {
    std::ifstream in(dir / name);
    std::string line, out;
    for (int u = 0; u < users && std::getline(in, line); ++u) {
      std::istringstream ss(line);
      long user, item;
      ss >> user;
      out += std::to_string(user);
      while (ss >> item) {
        const long id = renumber.emplace(item, long(renumber.size()) + 1).first->second;
        out += " " + std::to_string(id);
      }
      out += "\n";
    }
    files.push_back(out);
  }
  std::ifstream jin(dir / "beauty.LCRec-1e-3lr.json");
  const nlohmann::json codes = nlohmann::json::parse(jin);
  nlohmann::ordered_json sub = nlohmann::ordered_json::object();
  std::vector<std::pair<long, long>> order(renumber.begin(), renumber.end());
  std::sort(order.begin(), order.end(), [](auto a, auto b) { return a.second < b.second; });
  for (const auto& [item, id] : order) sub[std::to_string(id - 1)] = codes.at(std::to_string(item - 1));
  return files[0] + '\0' + files[1] + '\0' + files[2] + '\0' + sub.dump();
}

void hf_seeds() {
  const fs::path fixtures = fs::path(EARN_SOURCE_DIR) / "tests/fixtures/hf";
  const std::string index = earn::io::detail::read_file_text(fixtures / "qwen2_sharded/model.safetensors.index.json");
  for (const char* m : {"qwen2_sharded", "llama_gqa", "llama_tied_bf16", "qwen2_tied_f16_v4"})
    write_seed("hf", m, earn::io::detail::read_file_text(fixtures / m / "config.json") + '\0' + index);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: make_corpus <shared data dir> <out dir>\n");
    return 2;
  }
  const fs::path data = argv[1];
  out_root = argv[2];
  try {
    const earn::ModelWeights w = earn::io::load_llama2c(data / "llama2c/stories260K.bin");
    safetensors_seeds(w);
    // Valid seeds start libFuzzer deep inside the loaders; each is loaded once here to make sure it is.
    for (const auto& [name, seed] : {std::pair{"tied", llama2c_seed(w, 16, 24, 2, 4, 2, 24, 8, true)},
                                     std::pair{"untied", llama2c_seed(w, 8, 12, 1, 2, 1, 12, 4, false)}}) {
      (void)earn::io::load_llama2c(std::as_bytes(std::span(seed.data(), seed.size())), name);
      write_seed("llama2c", name, seed);
    }
    const std::string real = earn::io::detail::read_file_text(data / "llama2c/stories260K.bin");
    write_seed("llama2c", "real_header", real.substr(0, 2048));  // the real header over a truncated body
    tokenizer_seeds(data);
    for (int users : {40, 8}) {
      const std::string seed = dataset_seed(data / "amazon-beauty", users);
      const auto part = earn::fuzz::split_nul(reinterpret_cast<const std::uint8_t*>(seed.data()), seed.size(), 4);
      (void)earn::rec::Dataset::parse(
          {std::string(part[0]), std::string(part[1]), std::string(part[2]), std::string(part[3])});
      write_seed("dataset", "beauty" + std::to_string(users), seed);
    }
    hf_seeds();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make_corpus: %s\n", e.what());
    return 1;
  }
  return 0;
}
