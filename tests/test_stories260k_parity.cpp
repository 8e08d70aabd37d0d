// End-to-end parity with llama2.c: the real pretrained stories260K model, loaded by earn's llama2.c loader, run
// by the dense CPU engine and decoded greedily from BOS, prints byte for byte what run.c printed
// (../shared/data/llama2c/expected_stories260K_t0_n{200,256}.txt, saved outputs of the reference C program).
#include <doctest/doctest.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "earn/generate/generate.hpp"
#include "earn/io/llama2c.hpp"
#include "earn/model/engine.hpp"
#include "earn/schedule/presets.hpp"
#include "earn/tokenizer/llama2c.hpp"
#include "support.hpp"

namespace {

std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  REQUIRE(in);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

/// Index of the first differing byte, for a readable failure.
std::size_t first_difference(const std::string& a, const std::string& b) {
  std::size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  return i;
}

}  // namespace

TEST_CASE("stories260K greedy decoding from BOS prints exactly what llama2.c's run.c printed") {
  EARN_REQUIRE_SHARED(model_path, "llama2c/stories260K.bin");
  EARN_REQUIRE_SHARED(tok_path, "llama2c/tok512.bin");
  EARN_REQUIRE_SHARED(n200_path, "llama2c/expected_stories260K_t0_n200.txt");
  EARN_REQUIRE_SHARED(n256_path, "llama2c/expected_stories260K_t0_n256.txt");
  const earn::ModelWeights w = earn::io::load_llama2c(model_path);
  const earn::Llama2cTokenizer tok(tok_path, w.config.vocab_size);
  const earn::Engine<earn::DenseSchedule> engine(w);
  const std::vector<int> prompt = {earn::Llama2cTokenizer::kBos};  // run.c's encode of the empty prompt

  // run.c with steps = n runs n forward passes at positions 0..n-1, each emitting a token, and stops early
  // only if it samples BOS. The saved n200 text lacks run.c's final newline, the n256 text has it.
  struct Case {
    int steps;
    const std::filesystem::path* expected;
    const char* tail;
  };
  for (const Case& c : {Case{200, &n200_path, ""}, Case{256, &n256_path, "\n"}}) {
    INFO("steps = " << c.steps);
    earn::GenerateOptions opt;
    opt.max_new_tokens = c.steps;
    opt.temperature = 0.0f;
    opt.stop_token = earn::Llama2cTokenizer::kBos;
    const std::vector<int> out = earn::generate(engine, prompt, opt);
    const std::string want = read_text(*c.expected);
    // The first piece follows BOS, so its dummy-prefix space is stripped, as run.c's decode does.
    const std::string got = tok.decode(out, earn::Llama2cTokenizer::kBos) + c.tail;
    const std::size_t at = first_difference(got, want);
    INFO("first difference at byte " << at << " of " << want.size() << "; earn printed:\n" << got);
    CHECK(got == want);
    // run.c never stopped on BOS here: every one of the n steps emitted a token.
    CHECK(out.size() == std::size_t(c.steps));
  }

  // steps = seq_len (512), which run.c accepts: 512 forward passes, the last token printed and never fed. Greedy
  // decoding makes its first 256 tokens the 256-step run's.
  earn::GenerateOptions full;
  full.max_new_tokens = w.config.max_seq_len;
  full.stop_token = earn::Llama2cTokenizer::kBos;
  const std::vector<int> out512 = earn::generate(engine, prompt, full);
  const std::vector<int> out256 = earn::generate(engine, prompt, {.max_new_tokens = 256, .stop_token = 1});
  REQUIRE(out512.size() >= out256.size());
  CHECK(std::equal(out256.begin(), out256.end(), out512.begin()));
  CHECK(out512.size() <= 512u);
}
