// The built-in training corpus: short children's stories generated from a tiny grammar.
// It exists so that training works out of the box (no files, no download) and so that
// end-to-end tests have a target a small model can actually reach: the stories reuse a
// few dozen words in fixed templates and repeat the story's own characters, so a
// byte-level 2-layer model drives the loss far below the byte unigram entropy quickly.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mop::data {

// n_docs stories, each 200-600 bytes, fully determined by seed (and the first k documents
// of a longer call equal a call with n_docs = k, since stories are drawn in order).
std::vector<std::string> builtin_corpus(int n_docs, uint64_t seed);

// Entropy in nats of the empirical token distribution: the loss of the best model that
// ignores context. A trained model should beat it by a wide margin. Tokens outside
// [0, vocab) throw mop::Error; an empty input gives 0.
double unigram_entropy_nats(const std::vector<int32_t>& tokens, int vocab);

}  // namespace mop::data
