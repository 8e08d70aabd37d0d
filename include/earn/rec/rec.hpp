// earn/rec/rec.hpp - everything of the generative-recommendation loop: data, code tokens, prompts, trie, metrics,
// beam search.
//
//   Dataset::load(dir) -> cases of train/valid/test     (dataset.hpp, catalogue.hpp)
//   ItemVocab(base): <L_code> = base + level*256 + code  (item_vocab.hpp)
//   PromptBuilder: [head][items, separated][tail]        (prompt.hpp)
//   CodeTrie -> BeamSearch(engine, trie, {.beam = 20})  (trie.hpp, beam_search.hpp)
//   MetricAccumulator: Recall@K, NDCG@K                  (metrics.hpp)
#pragma once

#include "earn/rec/beam_search.hpp"
#include "earn/rec/catalogue.hpp"
#include "earn/rec/dataset.hpp"
#include "earn/rec/evaluate.hpp"
#include "earn/rec/item_vocab.hpp"
#include "earn/rec/metrics.hpp"
#include "earn/rec/prompt.hpp"
#include "earn/rec/trie.hpp"
