// llama2.c tokenizer: the Llama-2 vocabulary against the ids llama2.c's own test.c expects, hand-derived merge
// orders on a synthetic vocabulary (ties, the -1e10 score floor, run.c's UTF-8 grouping quirks, byte fallback),
// round trips with tok512.bin, and refusal of malformed files.
#include <doctest/doctest.h>

#include <chrono>
#include <climits>
#include <cmath>
#include <limits>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "earn/core/tensor.hpp"
#include "earn/tokenizer/llama2c.hpp"
#include "support.hpp"
#include "tokenizer_reference.hpp"

using earn::Llama2cTokenizer;

namespace {

using Bytes = std::vector<std::byte>;

void put_i32(Bytes& b, std::int32_t v) {
  unsigned char raw[4];
  std::memcpy(raw, &v, 4);  // the test machine is little-endian, as the format
  for (unsigned char c : raw) b.push_back(std::byte(c));
}
void put_f32(Bytes& b, float v) {
  std::int32_t i;
  std::memcpy(&i, &v, 4);
  put_i32(b, i);
}

/// A tokenizer file written naively: header, then (score, length, bytes) per token.
Bytes tokenizer_file(std::int32_t max_len, const std::vector<std::pair<float, std::string>>& tokens) {
  Bytes b;
  put_i32(b, max_len);
  for (const auto& [score, piece] : tokens) {
    put_f32(b, score);
    put_i32(b, static_cast<std::int32_t>(piece.size()));
    for (char c : piece) b.push_back(std::byte(static_cast<unsigned char>(c)));
  }
  return b;
}

/// <unk>, BOS, EOS and the 256 byte pieces, as llama2.c's exported vocabularies begin; ids 259.. follow.
std::vector<std::pair<float, std::string>> base_vocab() {
  std::vector<std::pair<float, std::string>> v = {{0.f, "<unk>"}, {0.f, "\n<s>\n"}, {0.f, "\n</s>\n"}};
  const char* hex = "0123456789ABCDEF";
  for (int i = 0; i < 256; ++i) v.push_back({0.f, std::string("<0x") + hex[i / 16] + hex[i % 16] + ">"});
  return v;
}

Bytes read_all(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Bytes b(s.size());
  std::memcpy(b.data(), s.data(), s.size());
  return b;
}

/// One line of tokenizer_bin_expected_ids.txt: a C string literal, a TAB, space-separated ids.
struct ExpectedEncoding {
  std::string prompt;
  std::vector<int> ids;
};

std::vector<ExpectedEncoding> read_expected(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::vector<ExpectedEncoding> out;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    REQUIRE(line[0] == '"');
    ExpectedEncoding e;
    std::size_t i = 1;
    for (; i < line.size() && line[i] != '"'; ++i) {
      if (line[i] != '\\') {
        e.prompt += line[i];
        continue;
      }
      REQUIRE(i + 1 < line.size());
      switch (line[++i]) {
        case 'n': e.prompt += '\n'; break;
        case 't': e.prompt += '\t'; break;
        case 'r': e.prompt += '\r'; break;
        case '\\': e.prompt += '\\'; break;
        case '"': e.prompt += '"'; break;
        default: FAIL("unknown escape in " << line);
      }
    }
    REQUIRE(i + 1 < line.size());
    REQUIRE(line[i + 1] == '\t');
    std::istringstream ids(line.substr(i + 2));
    for (int id; ids >> id;) e.ids.push_back(id);
    out.push_back(std::move(e));
  }
  return out;
}

}  // namespace

TEST_CASE("tokenizer.bin encodes llama2.c test.c's prompts to exactly its ids") {
  EARN_REQUIRE_SHARED(tok_path, "llama2c/tokenizer.bin");
  EARN_REQUIRE_SHARED(expected_path, "llama2c/tokenizer_bin_expected_ids.txt");
  const Llama2cTokenizer tok(tok_path, 32000);
  CHECK(tok.vocab_size() == 32000);
  CHECK(tok.max_token_length() == 27);
  const auto expected = read_expected(expected_path);
  REQUIRE(expected.size() == 5);
  CHECK(expected[0].prompt.empty());
  CHECK(expected[4].prompt.find("poivrée") != std::string::npos);  // multi-byte UTF-8 survives the parse
  for (const auto& e : expected) {
    INFO("prompt: " << e.prompt);
    CHECK(tok.encode(e.prompt, true, false) == e.ids);
    // SentencePiece decoding inverts it: the dummy-prefix space goes with BOS.
    CHECK(tok.decode(e.ids) == e.prompt);
  }
}

TEST_CASE("merges follow run.c on a hand-built vocabulary") {
  auto v = base_vocab();
  const int sp = 259, a = 260, b = 261, c = 262, ab = 263, bc = 264, sp_a = 265, abc = 266, aa = 267;
  v.push_back({0.0f, " "});
  v.push_back({0.0f, "a"});
  v.push_back({0.0f, "b"});
  v.push_back({0.0f, "c"});
  v.push_back({1.0f, "ab"});
  v.push_back({2.0f, "bc"});
  v.push_back({0.5f, " a"});
  v.push_back({3.0f, "abc"});
  v.push_back({1.0f, "aa"});
  v.push_back({-2e10f, "cc"});            // 268: below run.c's -1e10 floor, never merged
  v.push_back({5.0f, "\xC3\xA9"});        // 269: "é" as one piece
  v.push_back({0.0f, "b"});               // 270: a duplicate of 261; lookups take the lowest id
  const Bytes file = tokenizer_file(6, v);
  const Llama2cTokenizer tok(file, "hand.bin");
  REQUIRE(tok.vocab_size() == 271);

  // " abc": pairs " a" 0.5, "ab" 1, "bc" 2 -> bc; then " a" 0.5, "abc" 3 -> abc; " abc" is no piece.
  CHECK(tok.encode("abc", false, false) == std::vector<int>{sp, abc});
  // Equal scores: the leftmost pair merges first, so "aaa" is [aa, a], not [a, aa].
  CHECK(tok.encode("aaa", false, false) == std::vector<int>{sp, aa, a});
  CHECK(tok.encode("aaaa", true, true) == std::vector<int>{1, sp, aa, aa, 2});
  CHECK(tok.encode("ba", false, false) == std::vector<int>{sp, b, a});  // " b" and "ba" are no pieces
  CHECK(tok.encode("cc", false, false) == std::vector<int>{sp, c, c});
  CHECK(tok.encode("", true, false) == std::vector<int>{1});  // no dummy prefix for empty text
  CHECK(tok.encode("", false, true) == std::vector<int>{2});
  CHECK(tok.encode("", false, false).empty());
  // A codepoint that is a piece is one token; one that is not becomes its bytes, id = byte + 3.
  CHECK(tok.encode("\xC3\xA9", false, false) == std::vector<int>{sp, 269});
  CHECK(tok.encode("\xC3\xA8", false, false) == std::vector<int>{sp, 0xC3 + 3, 0xA8 + 3});
  // run.c groups up to 4 bytes while continuation bytes follow, so a stray one glues onto "é" and the group
  // "\xC3\xA9\xA9" (no piece) falls back to three byte tokens.
  CHECK(tok.encode("\xC3\xA9\xA9", false, false) == std::vector<int>{sp, 0xC3 + 3, 0xA9 + 3, 0xA9 + 3});
  // Five continuation bytes: a group of 4 then a group of 1, all bytes.
  CHECK(tok.encode("\x80\x80\x80\x80\x80", false, false) ==
        std::vector<int>{sp, 0x83, 0x83, 0x83, 0x83, 0x83});
  // A lone lead byte at the end of the text is its own group.
  CHECK(tok.encode("a\xC3", false, false) == std::vector<int>{sp_a, 0xC3 + 3});
  CHECK(tok.find("b") == b);
  CHECK(tok.find("zz") == -1);
  CHECK(tok.piece(ab) == "ab");
  CHECK(tok.score(bc) == 2.0f);
  (void)c;
}

TEST_CASE("a vocabulary without the dummy-prefix piece falls back to the byte token of the space") {
  auto v = base_vocab();
  v.push_back({0.0f, "a"});  // 259
  const Bytes file = tokenizer_file(6, v);
  const Llama2cTokenizer tok(file, "nospace.bin");
  CHECK(tok.encode("a", true, false) == std::vector<int>{1, 0x20 + 3, 259});
}

TEST_CASE("decode_piece strips the space after BOS and turns <0xXX> into bytes") {
  auto v = base_vocab();
  v.push_back({0.0f, " t"});     // 259
  v.push_back({0.0f, "<0x4>"});  // 260: not an exact byte piece, stays text
  v.push_back({0.0f, " "});      // 261
  const Bytes file = tokenizer_file(6, v);
  const Llama2cTokenizer tok(file, "pieces.bin");
  CHECK(tok.decode_piece(1, 259) == "t");
  CHECK(tok.decode_piece(5, 259) == " t");
  CHECK(tok.decode_piece(-1, 259) == " t");
  CHECK(tok.decode_piece(1, 261) == "");
  CHECK(tok.decode_piece(7, 'A' + 3) == "A");
  CHECK(tok.decode_piece(7, 3) == std::string(1, '\0'));
  CHECK(tok.decode_piece(7, 0xFF + 3) == std::string(1, '\xFF'));
  CHECK(tok.decode_piece(7, 260) == "<0x4>");
  CHECK(tok.decode_piece(7, 2) == "\n</s>\n");
  const std::vector<int> seq = {1, 259, 259, 1, 259, 'x' + 3};
  CHECK(tok.decode(seq) == "t tt" "x");
  CHECK(tok.decode(std::vector<int>{259, 259}, 1) == "t t");
  CHECK_THROWS_AS(tok.decode_piece(1, 262), earn::RangeError);
  CHECK_THROWS_AS(tok.decode_piece(1, -1), earn::RangeError);
  CHECK_THROWS_AS(tok.piece(262), earn::RangeError);
  CHECK_THROWS_AS(tok.score(-5), earn::RangeError);
  CHECK_THROWS_AS(tok.decode(std::vector<int>{259, 999}), earn::RangeError);
  CHECK_THROWS_AS(tok.decode(std::vector<int>{INT_MIN}), earn::RangeError);
}

TEST_CASE("byte fallback past a small vocabulary is a RangeError, not an out-of-range id") {
  const Bytes file = tokenizer_file(5, {{0.f, "<unk>"}, {0.f, "<s>"}, {0.f, "</s>"}, {0.f, " "}, {0.f, "a"}});
  const Llama2cTokenizer tok(file, "small.bin");
  CHECK(tok.encode("a", true, false) == std::vector<int>{1, 3, 4});
  CHECK_THROWS_AS(tok.encode("b", true, false), earn::RangeError);
}

TEST_CASE("tok512.bin round-trips ASCII and multi-byte UTF-8") {
  EARN_REQUIRE_SHARED(tok_path, "llama2c/tok512.bin");
  const Llama2cTokenizer tok(tok_path, 512);
  const Llama2cTokenizer inferred(tok_path);
  CHECK(inferred.vocab_size() == 512);
  CHECK(tok.max_token_length() == 7);
  REQUIRE(tok.piece(410) == " ");
  REQUIRE(tok.piece(259) == " t");
  // No piece holds this emoji, so it is its four bytes after the dummy-prefix space (" <0xF0>" is no piece).
  CHECK(tok.encode("\xF0\x9F\x99\x82", true, false) ==
        std::vector<int>{1, 410, 0xF0 + 3, 0x9F + 3, 0x99 + 3, 0x82 + 3});
  const std::vector<std::string> texts = {
      "Once upon a time, there was a little girl named Lily.",
      "  two leading spaces, a tab\tand\nnewlines\n",
      "caf\xC3\xA9 na\xC3\xAFve \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x99\x82 \xE2\x80\x94 done",
      "x",
  };
  for (const auto& text : texts) {
    INFO("text: " << text);
    const auto with_bos = tok.encode(text, true, false);
    REQUIRE(with_bos.size() >= 2);
    CHECK(with_bos.front() == 1);
    for (int id : with_bos) CHECK((id >= 0 && id < 512));
    CHECK(tok.decode(with_bos) == text);
    CHECK(tok.decode(tok.encode(text, false, false)) == " " + text);
    CHECK(inferred.encode(text, true, true) == [&] { auto v = with_bos; v.push_back(2); return v; }());
    // Merging only shortens: never more tokens than BOS + prefix + bytes.
    CHECK(with_bos.size() <= text.size() + 2);
  }
  // Common words of TinyStories are single pieces, so merging really happens.
  CHECK(tok.encode("Once upon a time", false, false).size() < 8);
}

TEST_CASE("malformed tokenizer files throw FormatError") {
  auto v = base_vocab();
  v.push_back({-1.0f, " x"});
  const Bytes good = tokenizer_file(6, v);
  REQUIRE_NOTHROW(Llama2cTokenizer(good, "good.bin", 260));

  SUBCASE("every truncation, explicit and inferred vocabulary size") {
    // Token boundaries: a cut there is a shorter but well-formed file when the size is inferred.
    std::vector<std::size_t> boundaries = {4};
    for (const auto& [s, p] : v) boundaries.push_back(boundaries.back() + 8 + p.size());
    REQUIRE(boundaries.back() == good.size());
    for (std::size_t cut = 0; cut < good.size(); ++cut) {
      INFO("cut at " << cut);
      const std::span<const std::byte> part(good.data(), cut);
      CHECK_THROWS_AS(Llama2cTokenizer(part, "cut.bin", 260), earn::FormatError);
      const auto it = std::find(boundaries.begin(), boundaries.end(), cut);
      const int tokens = static_cast<int>(it - boundaries.begin());
      if (it != boundaries.end() && tokens >= 3)
        CHECK(Llama2cTokenizer(part, "cut.bin").vocab_size() == tokens);
      else
        CHECK_THROWS_AS(Llama2cTokenizer(part, "cut.bin"), earn::FormatError);
    }
  }
  SUBCASE("vocabulary size mismatch") {
    CHECK_THROWS_AS(Llama2cTokenizer(good, "good.bin", 259), earn::FormatError);
    CHECK_THROWS_AS(Llama2cTokenizer(good, "good.bin", 261), earn::FormatError);
    CHECK_THROWS_AS(Llama2cTokenizer(good, "good.bin", INT_MAX), earn::FormatError);
    CHECK_THROWS_AS(Llama2cTokenizer(good, "good.bin", 0), earn::ConfigError);
    Bytes longer = good;
    longer.push_back(std::byte{0});
    CHECK_THROWS_AS(Llama2cTokenizer(longer, "long.bin", 260), earn::FormatError);
    CHECK_THROWS_AS(Llama2cTokenizer(longer, "long.bin"), earn::FormatError);
  }
  SUBCASE("lengths and header") {
    auto with_len = [&](std::int32_t len) {
      Bytes b = good;
      const std::size_t at = 4 + 3 * 8 + (5 + 5 + 6) + 4;  // length field of token 3 ("<0x00>")
      std::memcpy(&b[at], &len, 4);
      return b;
    };
    REQUIRE_NOTHROW(Llama2cTokenizer(with_len(6), "len.bin", 260));
    CHECK_THROWS_AS(Llama2cTokenizer(with_len(-1), "len.bin", 260), earn::FormatError);
    CHECK_THROWS_AS(Llama2cTokenizer(with_len(INT_MIN), "len.bin"), earn::FormatError);
    CHECK_THROWS_AS(Llama2cTokenizer(with_len(7), "len.bin", 260), earn::FormatError);  // > max_token_length 6
    CHECK_THROWS_AS(Llama2cTokenizer(with_len(INT_MAX), "len.bin"), earn::FormatError);
    try {
      Llama2cTokenizer(with_len(-1), "len.bin", 260);
    } catch (const earn::FormatError& e) {
      CHECK(std::string(e.what()).find("len.bin: token[3].length") == 0);
    }
    for (std::int32_t mtl : {0, -1, INT_MIN, INT_MAX}) {
      Bytes b = good;
      std::memcpy(&b[0], &mtl, 4);
      CHECK_THROWS_AS(Llama2cTokenizer(b, "mtl.bin"), earn::FormatError);
    }
    CHECK_THROWS_AS(Llama2cTokenizer(Bytes{}, "empty.bin"), earn::FormatError);
    const Bytes two = tokenizer_file(6, {{0.f, "a"}, {0.f, "b"}});
    CHECK_THROWS_AS(Llama2cTokenizer(two, "two.bin"), earn::FormatError);  // no room for BOS/EOS
  }
  SUBCASE("missing file") {
    CHECK_THROWS_AS(Llama2cTokenizer(std::filesystem::path("/nonexistent/tok.bin")), earn::IoError);
  }
}

TEST_CASE("every truncation of tok512.bin is refused when the model's vocabulary size is given") {
  EARN_REQUIRE_SHARED(tok_path, "llama2c/tok512.bin");
  const Bytes full = read_all(tok_path);
  REQUIRE(full.size() == 6227);
  for (std::size_t cut = 0; cut < full.size(); ++cut)
    CHECK_THROWS_AS(Llama2cTokenizer(std::span<const std::byte>(full.data(), cut), "tok512.bin", 512),
                    earn::FormatError);
  CHECK_THROWS_AS(Llama2cTokenizer(tok_path, 511), earn::FormatError);
  CHECK_THROWS_AS(Llama2cTokenizer(tok_path, 513), earn::FormatError);
}

TEST_CASE("random corruption of a tokenizer file parses or throws earn::Error, nothing else") {
  auto v = base_vocab();
  v.push_back({-1.0f, " x"});
  v.push_back({-2.0f, "x"});
  const Bytes good = tokenizer_file(6, v);
  earn::Rng rng(78);
  int refused = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    Bytes b = good;
    for (int f = 0, flips = 1 + int(rng.next_u64() % 3); f < flips; ++f)
      b[rng.next_u64() % b.size()] = std::byte(rng.next_u64() & 0xFF);
    if (rng.uniform() < 0.2f) b.resize(rng.next_u64() % (b.size() + 16));
    try {
      const Llama2cTokenizer tok(b, "fuzz.bin", rng.uniform() < 0.5f ? 261 : Llama2cTokenizer::kInferVocab);
      const auto ids = tok.encode("x x\xC3\xA9", true, true);
      (void)tok.decode(ids);
    } catch (const earn::Error&) {
      ++refused;
    } catch (const std::exception& e) {
      FAIL("trial " << trial << " threw a non-earn exception: " << e.what());
    }
  }
  CHECK(refused > 100);
}

TEST_CASE("the heap encoder equals run.c's O(n^2) loop: random texts, ties, NaN and -inf scores") {
  // A vocabulary whose merges collide: many pieces over a tiny alphabet, equal scores, scores at the -1e10 floor,
  // NaN (never merges in run.c: NaN > best is false) and duplicates.
  auto v = base_vocab();
  const std::vector<std::string> alphabet = {" ", "a", "b", "\xC3\xA9"};
  earn::Rng rng(5);
  for (const auto& p : alphabet) v.push_back({0.0f, p});
  for (int i = 0; i < 120; ++i) {
    std::string piece;
    for (int n = 2 + int(rng.next_u64() % 4); n > 0; --n) piece += alphabet[rng.next_u64() % alphabet.size()];
    const int kind = int(rng.next_u64() % 8);
    const float score = kind == 0   ? std::numeric_limits<float>::quiet_NaN()
                        : kind == 1 ? -1e10f
                        : kind == 2 ? -std::numeric_limits<float>::infinity()
                                    : float(int(rng.next_u64() % 5));  // few distinct values: many ties
    v.push_back({score, piece});
  }
  const Bytes file = tokenizer_file(16, v);
  const Llama2cTokenizer tok(file, "collide.bin");
  for (int trial = 0; trial < 400; ++trial) {
    std::string text;
    for (int n = int(rng.next_u64() % 60); n > 0; --n) text += alphabet[rng.next_u64() % alphabet.size()];
    if (trial % 7 == 0) text += "\x80\xC3";  // stray continuation / lead bytes: byte fallback
    CAPTURE(text);
    const bool bos = trial % 2, eos = trial % 3 == 0;
    CHECK(tok.encode(text, bos, eos) == earn::test::reference_encode(tok, text, bos, eos));
  }
}

TEST_CASE("encoding is not quadratic: 100k characters take well under a second's work") {
  // run.c's loop rescans every pair after each merge: 40k characters took about a minute, so 100k took several.
  // The heap encoder does n log n work; 10 s leaves room for sanitizers and a loaded machine.
  auto v = base_vocab();
  v.push_back({0.0f, " "});
  v.push_back({0.0f, "a"});
  for (std::string p = "aa"; p.size() <= 16; p += p) v.push_back({-float(p.size()), p});
  const Bytes file = tokenizer_file(16, v);
  const Llama2cTokenizer tok(file, "long.bin");
  const std::string text(100000, 'a');
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int> ids = tok.encode(text, true, false);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(s < 10.0);
  // 100000 = 6250 * 16: BOS, the space, then every run of 16 a's one token.
  CHECK(ids.size() == 2 + 6250);
  CHECK(tok.decode(ids) == text);
}
