// llama2.c checkpoint loader: stories260K.bin against a naive fread of floats at hand-computed offsets, a
// synthetic checkpoint written by a naive writer (tied and untied), and hostile bytes - every truncation,
// extra bytes, absurd header fields - which must throw FormatError and never crash or over-allocate.
#include <doctest/doctest.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "earn/io/llama2c.hpp"
#include "support.hpp"

using earn::FormatError;
using earn::Index;
using earn::ModelConfig;
using earn::ModelWeights;
using earn::io::load_llama2c;

namespace {

using Bytes = std::vector<std::byte>;

void put_i32(Bytes& b, std::int32_t v) {
  const std::size_t at = b.size();
  b.resize(at + 4);
  std::memcpy(&b[at], &v, 4);  // little-endian host, as the format
}
void put_floats(Bytes& b, const float* p, Index n) {
  const std::size_t at = b.size();
  b.resize(at + static_cast<std::size_t>(n) * 4);
  if (n) std::memcpy(&b[at], p, static_cast<std::size_t>(n) * 4);
}

/// A llama2.c checkpoint written naively from `w`: header, tensors stacked over layers, `rope_floats` legacy
/// RoPE floats (whatever values), then wcls when the head is untied (signalled by a negative vocab size).
Bytes write_llama2c(const ModelWeights& w) {
  const ModelConfig& c = w.config;
  Bytes b;
  for (int v : {c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                c.tied_embeddings ? c.vocab_size : -c.vocab_size, c.max_seq_len})
    put_i32(b, v);
  put_floats(b, w.tok_embeddings.data(), w.tok_embeddings.size());
  for (const auto& l : w.layers) put_floats(b, l.attn_norm.data(), l.attn_norm.size());
  for (const auto& l : w.layers) put_floats(b, l.wq.data(), l.wq.size());
  for (const auto& l : w.layers) put_floats(b, l.wk.data(), l.wk.size());
  for (const auto& l : w.layers) put_floats(b, l.wv.data(), l.wv.size());
  for (const auto& l : w.layers) put_floats(b, l.wo.data(), l.wo.size());
  for (const auto& l : w.layers) put_floats(b, l.ffn_norm.data(), l.ffn_norm.size());
  for (const auto& l : w.layers) put_floats(b, l.w1.data(), l.w1.size());
  for (const auto& l : w.layers) put_floats(b, l.w2.data(), l.w2.size());
  for (const auto& l : w.layers) put_floats(b, l.w3.data(), l.w3.size());
  put_floats(b, w.final_norm.data(), w.final_norm.size());
  const std::vector<float> rope(2 * std::size_t(c.max_seq_len) * c.head_dim() / 2, 7.5f);
  put_floats(b, rope.data(), Index(rope.size()));
  if (!c.tied_embeddings) put_floats(b, w.lm_head.data(), w.lm_head.size());
  return b;
}

ModelConfig tiny_config(bool tied) {
  ModelConfig c;
  c.dim = 8;
  c.hidden_dim = 12;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.vocab_size = 11;
  c.max_seq_len = 6;
  c.tied_embeddings = tied;
  c.rope_style = earn::RopeStyle::kInterleaved;
  return c;
}

ModelWeights tiny_weights(bool tied) {
  ModelWeights w = earn::random_weights(tiny_config(tied), {.seed = tied ? 5u : 6u});
  w.registers.prefix.resize(0, w.config.dim);  // the format has no registers
  w.registers.suffix.resize(0, w.config.dim);
  return w;
}

/// Same shape and bit-equal values (Eigen's == needs equal shapes).
template <class A, class B>
bool same(const A& a, const B& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && a == b;
}

void check_equal(const ModelWeights& got, const ModelWeights& want) {
  CHECK(same(got.tok_embeddings, want.tok_embeddings));
  REQUIRE(got.layers.size() == want.layers.size());
  for (std::size_t i = 0; i < got.layers.size(); ++i) {
    INFO("layer " << i);
    const auto &g = got.layers[i], &e = want.layers[i];
    CHECK(same(g.attn_norm, e.attn_norm));
    CHECK(same(g.wq, e.wq));
    CHECK(same(g.wk, e.wk));
    CHECK(same(g.wv, e.wv));
    CHECK(same(g.wo, e.wo));
    CHECK(same(g.ffn_norm, e.ffn_norm));
    CHECK(same(g.w1, e.w1));
    CHECK(same(g.w2, e.w2));
    CHECK(same(g.w3, e.w3));
    CHECK(g.bq.size() == 0);
  }
  CHECK(same(got.final_norm, want.final_norm));
  CHECK(same(got.lm_head, want.lm_head));
}

std::string message_of(const Bytes& b, const std::string& name = "t.bin") {
  try {
    load_llama2c(b, name);
  } catch (const FormatError& e) {
    return e.what();
  }
  return "no FormatError";
}

/// `b` with header field `i` (0 dim .. 6 seq_len) replaced.
Bytes with_header(Bytes b, int i, std::int32_t v) {
  std::memcpy(&b[4 * std::size_t(i)], &v, 4);
  return b;
}

/// One float read with plain stdio at byte offset `at` - the independent reference for the loader.
float fread_float(const std::filesystem::path& p, long at) {
  std::FILE* f = std::fopen(p.string().c_str(), "rb");
  REQUIRE(f != nullptr);
  float v = 0;
  REQUIRE(std::fseek(f, at, SEEK_SET) == 0);
  REQUIRE(std::fread(&v, 4, 1, f) == 1);
  std::fclose(f);
  return v;
}

}  // namespace

TEST_CASE("stories260K.bin: config and weights equal a naive fread at computed offsets") {
  EARN_REQUIRE_SHARED(path, "llama2c/stories260K.bin");
  const ModelWeights w = load_llama2c(path);
  const ModelConfig& c = w.config;
  CHECK(c.dim == 64);
  CHECK(c.hidden_dim == 172);
  CHECK(c.n_layers == 5);
  CHECK(c.n_heads == 8);
  CHECK(c.n_kv_heads == 4);
  CHECK(c.vocab_size == 512);
  CHECK(c.max_seq_len == 512);
  CHECK(c.tied_embeddings);
  CHECK(c.rope_style == earn::RopeStyle::kInterleaved);
  CHECK(c.rope_theta == 10000.0f);
  CHECK(c.norm_eps == 1e-5f);
  CHECK_FALSE(c.qkv_bias);
  CHECK(w.lm_head.size() == 0);
  CHECK(w.registers.prefix.rows() == 0);
  CHECK(w.registers.prefix.cols() == 64);
  CHECK(w.registers.suffix.rows() == 0);
  CHECK(w.registers.suffix.cols() == 64);
  CHECK(w.split_layer == -1);

  // Offsets in floats after the 28-byte header, from the README's layout (written out by hand).
  const long D = 64, H = 172, L = 5, KV = 32, V = 512, S = 512, HD = 8;
  const long o_emb = 0, o_att = o_emb + V * D, o_wq = o_att + L * D, o_wk = o_wq + L * D * D,
             o_wv = o_wk + L * KV * D, o_wo = o_wv + L * KV * D, o_ffn = o_wo + L * D * D, o_w1 = o_ffn + L * D,
             o_w2 = o_w1 + L * H * D, o_w3 = o_w2 + L * D * H, o_fin = o_w3 + L * H * D, o_rope = o_fin + D;
  CHECK(28 + 4 * (o_rope + 2 * S * HD / 2) == long(std::filesystem::file_size(path)));
  auto ref = [&](long float_offset) { return fread_float(path, 28 + 4 * float_offset); };
  for (long r : {0L, 1L, 255L, 511L})
    for (long col : {0L, 37L, 63L}) CHECK(w.tok_embeddings(r, col) == ref(o_emb + r * D + col));
  CHECK(w.final_norm[0] == ref(o_fin));
  CHECK(w.final_norm[63] == ref(o_fin + 63));
  for (long l = 0; l < L; ++l) {
    INFO("layer " << l);
    const auto& lw = w.layers[std::size_t(l)];
    for (long i : {0L, 17L, 63L}) {
      CHECK(lw.attn_norm[i] == ref(o_att + l * D + i));
      CHECK(lw.ffn_norm[i] == ref(o_ffn + l * D + i));
    }
    // (row, col) pairs: the first, an inner and the last element of each matrix.
    CHECK(lw.wq(0, 0) == ref(o_wq + l * D * D));
    CHECK(lw.wq(5, 7) == ref(o_wq + l * D * D + 5 * D + 7));
    CHECK(lw.wq(63, 63) == ref(o_wq + l * D * D + 63 * D + 63));
    CHECK(lw.wk(31, 2) == ref(o_wk + l * KV * D + 31 * D + 2));
    CHECK(lw.wk(0, 63) == ref(o_wk + l * KV * D + 63));
    CHECK(lw.wv(30, 1) == ref(o_wv + l * KV * D + 30 * D + 1));
    CHECK(lw.wv(31, 63) == ref(o_wv + l * KV * D + 31 * D + 63));
    CHECK(lw.wo(9, 40) == ref(o_wo + l * D * D + 9 * D + 40));
    CHECK(lw.w1(171, 63) == ref(o_w1 + l * H * D + 171 * D + 63));
    CHECK(lw.w1(100, 3) == ref(o_w1 + l * H * D + 100 * D + 3));
    CHECK(lw.w2(63, 171) == ref(o_w2 + l * D * H + 63 * H + 171));
    CHECK(lw.w2(1, 170) == ref(o_w2 + l * D * H + 1 * H + 170));
    CHECK(lw.w3(0, 0) == ref(o_w3 + l * H * D));
    CHECK(lw.w3(150, 60) == ref(o_w3 + l * H * D + 150 * D + 60));
  }
  // Real weights: finite, not all zero (a misaligned read of a real checkpoint would show as garbage norms).
  CHECK(w.tok_embeddings.allFinite());
  CHECK((w.layers[4].w2.array() != 0.0f).any());
}

TEST_CASE("a synthetic checkpoint written naively round-trips, tied and untied") {
  for (bool tied : {true, false}) {
    INFO("tied " << tied);
    const ModelWeights want = tiny_weights(tied);
    const Bytes b = write_llama2c(want);
    const ModelWeights got = load_llama2c(b, "tiny.bin");
    CHECK(got.config.tied_embeddings == tied);
    CHECK(got.config.vocab_size == 11);
    CHECK(got.config.n_kv_heads == 1);
    CHECK(got.config.max_seq_len == 6);
    check_equal(got, want);
    CHECK(same(got.classifier(), tied ? want.tok_embeddings : want.lm_head));

    // Through a file as well.
    const auto file = std::filesystem::temp_directory_path() /
                      ("earn_test_llama2c_" + std::to_string(tied) + "_" + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()) + ".bin");
    {
      std::ofstream out(file, std::ios::binary);
      out.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
    }
    check_equal(load_llama2c(file), want);
    std::filesystem::remove(file);
  }
  CHECK_THROWS_AS(load_llama2c(std::filesystem::path("/nonexistent/model.bin")), earn::IoError);
}

TEST_CASE("every truncation and any extra byte of a synthetic checkpoint throws FormatError") {
  for (bool tied : {true, false}) {
    INFO("tied " << tied);
    const Bytes b = write_llama2c(tiny_weights(tied));
    for (std::size_t cut = 0; cut < b.size(); ++cut) {
      INFO("cut at " << cut);
      CHECK_THROWS_AS(load_llama2c(std::span<const std::byte>(b.data(), cut), "cut.bin"), FormatError);
    }
    for (std::size_t extra : {1, 3, 4, 1000}) {
      Bytes longer = b;
      longer.resize(b.size() + extra, std::byte{0x41});
      CHECK_THROWS_AS(load_llama2c(longer, "long.bin"), FormatError);
    }
  }
  // Header-level messages name the file and the field.
  const Bytes b = write_llama2c(tiny_weights(true));
  CHECK(message_of(Bytes(b.begin(), b.begin() + 6)).rfind("t.bin: header.hidden_dim: file ends at byte 6", 0) == 0);
  // dim 8, hidden 12, L 2, kv_dim 4, vocab 11: wq starts after the embedding and rms_att, 4 * (88 + 16) bytes in.
  const std::size_t wq_at = 28 + 4 * (11 * 8 + 2 * 8);
  CHECK(message_of(Bytes(b.begin(), b.begin() + wq_at + 5)) ==
        "t.bin: wq: file ends at byte " + std::to_string(wq_at + 5) + ", tensor [2, 8, 8] needs bytes [" +
            std::to_string(wq_at) + ", " + std::to_string(wq_at + 2 * 64 * 4) + ")");
}

TEST_CASE("hostile header fields throw FormatError before any allocation") {
  const Bytes b = write_llama2c(tiny_weights(true));
  REQUIRE_NOTHROW(load_llama2c(b, "ok.bin"));
  const char* names[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
  for (int field = 0; field < 7; ++field)
    for (std::int32_t v : {0, -1, -7, INT_MIN, INT_MAX, 1 << 30}) {
      INFO("header." << names[field] << " = " << v);
      CHECK_THROWS_AS(load_llama2c(with_header(b, field, v), "h.bin"), FormatError);
    }
  // The plausibility bounds name the field.
  CHECK(message_of(with_header(b, 0, INT_MAX)).rfind("t.bin: header.dim:", 0) == 0);
  CHECK(message_of(with_header(b, 5, INT_MIN)).rfind("t.bin: header.vocab_size:", 0) == 0);
  // Every field at its largest plausible value: sizes still fit int64, and the truncation is found from the
  // layout alone (an allocation of this model would need terabytes).
  Bytes huge = b;
  for (auto [field, v] : {std::pair{0, earn::io::Llama2cLimits::kMaxDim}, {1, earn::io::Llama2cLimits::kMaxHiddenDim},
                          {2, earn::io::Llama2cLimits::kMaxLayers}, {3, 2}, {4, 1},
                          {5, -earn::io::Llama2cLimits::kMaxVocab}, {6, earn::io::Llama2cLimits::kMaxSeqLen}})
    huge = with_header(huge, field, v);
  CHECK(message_of(huge).rfind("t.bin: token_embedding: file ends at byte", 0) == 0);

  SUBCASE("divisibility as ModelConfig::validate") {
    CHECK(message_of(with_header(b, 3, 3)).rfind("t.bin: header.n_heads: 3 does not divide dim 8", 0) == 0);
    CHECK(message_of(with_header(b, 3, 16)).rfind("t.bin: header.n_heads:", 0) == 0);  // more heads than dim
    // dim 8 / 8 heads = head_dim 1: odd, no RoPE pairs.
    CHECK(message_of(with_header(with_header(b, 3, 8), 4, 1)).rfind("t.bin: header.n_heads: head_dim 1", 0) == 0);
    // 2 heads, 3 kv heads: more kv heads than heads.
    CHECK(message_of(with_header(b, 4, 3)).rfind("t.bin: header.n_kv_heads:", 0) == 0);
    // 4 heads, 3 kv heads: not a divisor.
    CHECK(message_of(with_header(with_header(b, 3, 4), 4, 3)).rfind("t.bin: header.n_kv_heads: 3 does not", 0) == 0);
  }
  SUBCASE("the sign of vocab_size must match whether wcls is present") {
    const Bytes untied = write_llama2c(tiny_weights(false));
    // Negative without wcls: the file ends where wcls should be.
    CHECK(message_of(with_header(b, 5, -11)).rfind("t.bin: wcls: file ends at byte " + std::to_string(b.size()), 0) ==
          0);
    // Positive with wcls: wcls is extra bytes, and the message says what they would fit.
    const std::string m = message_of(with_header(untied, 5, 11));
    CHECK(m.rfind("t.bin: end: " + std::to_string(11 * 8 * 4) + " bytes after the last tensor", 0) == 0);
    CHECK(m.find("untied classifier") != std::string::npos);
    CHECK_NOTHROW(load_llama2c(untied, "untied.bin"));
  }
}

TEST_CASE("stories260K.bin: truncations at every tensor boundary and many cut points throw FormatError") {
  EARN_REQUIRE_SHARED(path, "llama2c/stories260K.bin");
  std::ifstream in(path, std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Bytes b(s.size());
  std::memcpy(b.data(), s.data(), s.size());
  REQUIRE_NOTHROW(load_llama2c(b, "stories260K.bin"));

  std::vector<std::size_t> cuts;
  for (std::size_t c = 0; c <= 32; ++c) cuts.push_back(c);
  // Tensor boundaries (in floats after the header) +- 1 byte.
  const std::size_t D = 64, H = 172, L = 5, KV = 32, V = 512;
  std::size_t off = 0;
  for (std::size_t n : {V * D, L * D, L * D * D, L * KV * D, L * KV * D, L * D * D, L * D, L * H * D, L * D * H,
                        L * H * D, D, std::size_t(512 * 4), std::size_t(512 * 4)}) {
    off += n;
    for (std::size_t d : {0, 1, 2, 3, 4, 5}) cuts.push_back(28 + 4 * off - d);
  }
  for (std::size_t c = 0; c < b.size(); c += 4099) cuts.push_back(c);
  for (std::size_t cut : cuts) {
    if (cut >= b.size()) continue;
    INFO("cut at " << cut);
    CHECK_THROWS_AS(load_llama2c(std::span<const std::byte>(b.data(), cut), "stories260K.bin"), FormatError);
  }
  // The message names the field whose bytes are missing.
  const std::size_t wq_at = 28 + 4 * (V * D + L * D);
  const std::string m = message_of(Bytes(b.begin(), b.begin() + wq_at + 100), "stories260K.bin");
  CHECK(m.rfind("stories260K.bin: wq: file ends at byte " + std::to_string(wq_at + 100), 0) == 0);
  Bytes longer = b;
  longer.push_back(std::byte{0});
  CHECK_THROWS_AS(load_llama2c(longer, "stories260K.bin"), FormatError);
}

TEST_CASE("random corruption of a synthetic checkpoint loads or throws earn::Error, nothing else") {
  const Bytes good = write_llama2c(tiny_weights(false));
  earn::Rng rng(77);
  int refused = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    Bytes b = good;
    // Mostly the header, where corruption changes the layout; sometimes the body or the length.
    const int flips = 1 + int(rng.next_u64() % 3);
    for (int f = 0; f < flips; ++f) {
      const std::size_t at = rng.uniform() < 0.8f ? rng.next_u64() % 28 : rng.next_u64() % b.size();
      b[at] = std::byte(rng.next_u64() & 0xFF);
    }
    if (rng.uniform() < 0.2f) b.resize(rng.next_u64() % (b.size() + 64));
    try {
      const ModelWeights w = load_llama2c(b, "fuzz.bin");
      CHECK(w.parameter_count() > 0);
    } catch (const earn::Error&) {
      ++refused;
    } catch (const std::exception& e) {
      FAIL("trial " << trial << " threw a non-earn exception: " << e.what());
    }
  }
  CHECK(refused > 1000);  // header corruption is nearly always caught
}
