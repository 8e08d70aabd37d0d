// Fuzzes the llama2.c tokenizer (earn/tokenizer/llama2c.hpp). The first byte picks what the rest is:
//   even  a tokenizer file: parsed, then fixed texts are encoded and decoded with it
//   odd   a text: encoded with tok512.bin (../shared/data; a built-in vocabulary when absent) and decoded
// Beyond "earn errors only", two oracles: the encoder equals run.c's naive loop (tests/tokenizer_reference.hpp)
// on texts up to 128 bytes, and with tok512.bin decode(encode(text, BOS)) gives the text back.
// Seeds: tok512.bin, a cut of tokenizer.bin, the prompts of tokenizer_bin_expected_ids.txt and stories260K's text.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>

#include "earn/tokenizer/llama2c.hpp"
#include "fuzz_support.hpp"
#include "tokenizer_reference.hpp"

namespace {

// The reference is run.c's O(n^2) loop: past ~128 bytes it would dominate the harness's time.
constexpr std::size_t kReferenceBytes = 128;

[[noreturn]] void oracle_failed(const char* what) {
  std::fprintf(stderr, "fuzz_tokenizer: %s\n", what);
  std::abort();
}

// The fast encoder against the reference; a RangeError (byte fallback past a small vocabulary) must be common to both.
void check_encode(const earn::Llama2cTokenizer& tok, std::string_view text, bool roundtrip) {
  std::vector<int> ids;
  try {
    ids = tok.encode(text, true, false);
  } catch (const earn::RangeError&) {
    return;
  }
  if (text.size() <= kReferenceBytes && ids != earn::test::reference_encode(tok, text, true, false))
    oracle_failed("encode differs from run.c's loop");
  const std::string back = tok.decode(ids);
  if (roundtrip && back != text) oracle_failed("decode(encode(text)) differs from the text");
}

// tok512.bin when the shared data is there, else <unk>, BOS, EOS, the 256 byte pieces and a few merges.
const earn::Llama2cTokenizer& text_tokenizer() {
  static const earn::Llama2cTokenizer tok = [] {
    const auto real = std::filesystem::path(EARN_SHARED_DATA_DIR) / "llama2c" / "tok512.bin";
    if (earn::io::detail::exists_nothrow(real)) return earn::Llama2cTokenizer(real);
    std::vector<std::pair<float, std::string>> v = {{0.f, "<unk>"}, {0.f, "<s>"}, {0.f, "</s>"}};
    const char* hex = "0123456789ABCDEF";
    for (int i = 0; i < 256; ++i) v.push_back({0.f, std::string("<0x") + hex[i / 16] + hex[i % 16] + ">"});
    for (const char* p : {" ", "a", "b", "ab", " a", "aa", "ba", "aab", " ab", "é", " é"})
      v.push_back({-float(v.size()) / 8, p});
    std::vector<std::byte> file;
    auto put = [&](const void* p, std::size_t n) {
      for (std::size_t i = 0; i < n; ++i) file.push_back(static_cast<const std::byte*>(p)[i]);
    };
    const std::int32_t max_len = 16;
    put(&max_len, 4);
    for (const auto& [score, piece] : v) {
      const auto len = static_cast<std::int32_t>(piece.size());
      put(&score, 4);
      put(&len, 4);
      put(piece.data(), piece.size());
    }
    return earn::Llama2cTokenizer(file, "built-in vocabulary");
  }();
  return tok;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const bool is_text = data[0] & 1;
  earn::fuzz::clean([&] {
    if (is_text) {
      check_encode(text_tokenizer(), {reinterpret_cast<const char*>(data + 1), size - 1}, true);
      return;
    }
    const earn::Llama2cTokenizer tok(earn::fuzz::bytes(data + 1, size - 1), "fuzz.tokenizer");
    for (std::string_view text : {"Once upon a time", "a", "", "ab aab \xC3\xA9t\xC3\xA9 \xE6\x97\xA5\xF0\x9F\x98\x80",
                                  "\xFF\x80\x80\x80\x80\x80 <0x41>"})
      check_encode(tok, text, false);
    for (int id = 0; id < tok.vocab_size(); ++id) (void)tok.decode_piece(earn::Llama2cTokenizer::kBos, id);
  });
  return 0;
}
