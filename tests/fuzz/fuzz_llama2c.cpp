// Fuzzes the llama2.c checkpoint loader (earn/io/llama2c.hpp): the 7-int header, the layout checked against the
// byte count, the weights and ModelWeights::validate. Seeds: small checkpoints cut from the real stories260K (tied
// and untied) by tests/fuzz/make_corpus.cpp.
#include "earn/io/llama2c.hpp"
#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  earn::fuzz::clean([&] { (void)earn::io::load_llama2c(earn::fuzz::bytes(data, size), "fuzz.bin"); });
  return 0;
}
