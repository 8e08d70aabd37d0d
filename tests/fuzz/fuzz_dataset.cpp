// Fuzzes the LC-Rec data set loader (earn/rec/dataset.hpp). The input is the four files joined by NUL bytes:
// train NUL valid NUL test NUL codes JSON. An accepted data set is then used as evaluate uses it: the trie over its
// catalogue, every test case's code-template prompt, and the metrics of a ranked list against its targets.
// Seeds: the first users of the real Amazon Beauty files with their items renumbered and their codes
// (tests/fuzz/make_corpus.cpp).
#include "earn/rec/rec.hpp"
#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  earn::fuzz::clean([&] {
    const auto part = earn::fuzz::split_nul(data, size, 4);
    using namespace earn::rec;
    const Dataset ds = Dataset::parse({std::string(part[0]), std::string(part[1]), std::string(part[2]),
                                       std::string(part[3])},
                                      {.history_len = 5});
    (void)ds.counts();
    const ItemVocab vocab(CodeTemplate::kBaseVocab);
    const CodeTrie trie(ds.catalogue(), vocab);
    const PromptBuilder pb = PromptBuilder::code_tokens(vocab);
    MetricAccumulator acc({1, 5});
    for (const Case& c : ds.cases(DataSplit::kTest)) {
      (void)pb.build(ds.catalogue(), c.history);
      std::vector<int> ranked(c.targets.rbegin(), c.targets.rend());
      acc.add(ranked, c.targets);
    }
  });
  return 0;
}
