#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "core/error.h"
#include "data/corpus.h"
#include "data/prepare.h"
#include "data/tokenizer.h"

using namespace mop::data;

TEST(Tokenizer, RoundTripAllBytes) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.vocab_size(), 259);
  std::string s = "Hello, world!\n";
  for (int b = 0; b < 256; ++b) s.push_back(char(b));  // includes NUL and bytes >= 0x80
  std::vector<int32_t> ids = tok.encode(s);
  ASSERT_EQ(ids.size(), s.size());
  for (int32_t id : ids) EXPECT_TRUE(id >= 0 && id < 256);
  EXPECT_EQ(ids[0], 'H');
  EXPECT_EQ(ids.back(), 255);
  EXPECT_EQ(tok.decode(ids), s);
}

TEST(Tokenizer, DecodeSkipsSpecialsAndRejectsUnknown) {
  ByteTokenizer tok;
  std::vector<int32_t> ids = {kBos, 'h', 'i', kEos, kPad};
  EXPECT_EQ(tok.decode(ids), "hi");
  std::vector<int32_t> bad = {'a', 259};
  EXPECT_THROW(tok.decode(bad), mop::Error);
  std::vector<int32_t> neg = {-1};
  EXPECT_THROW(tok.decode(neg), mop::Error);
}

TEST(Tokenizer, TokenizeDocumentsAddsMarkers) {
  std::vector<int32_t> t = tokenize_documents({"ab", "", "c"});
  std::vector<int32_t> want = {kBos, 'a', 'b', kEos, kBos, kEos, kBos, 'c', kEos};
  EXPECT_EQ(t, want);
}

TEST(Corpus, DeterministicAndLearnableShape) {
  auto a = builtin_corpus(300, 7), b = builtin_corpus(300, 7), c = builtin_corpus(300, 8);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  // A prefix of a longer corpus is the shorter corpus.
  auto shorter = builtin_corpus(100, 7);
  EXPECT_TRUE(std::equal(shorter.begin(), shorter.end(), a.begin()));
  std::set<std::string> distinct(a.begin(), a.end());
  EXPECT_GT(distinct.size(), 250u);  // stories really vary
  for (const auto& d : a) {
    EXPECT_GE(d.size(), 200u);
    EXPECT_LE(d.size(), 600u);
    EXPECT_EQ(d.rfind("Once upon a time, ", 0), 0u) << d;
  }
  const double h = unigram_entropy_nats(tokenize_documents(a), kByteVocab);
  EXPECT_GT(h, 2.0);
  EXPECT_LT(h, std::log(double(kByteVocab)));
}

TEST(Corpus, UnigramEntropy) {
  EXPECT_DOUBLE_EQ(unigram_entropy_nats({}, 10), 0.0);
  EXPECT_DOUBLE_EQ(unigram_entropy_nats({3, 3, 3}, 10), 0.0);
  EXPECT_NEAR(unigram_entropy_nats({0, 1, 2, 3}, 4), std::log(4.0), 1e-12);
  EXPECT_THROW(unigram_entropy_nats({4}, 4), mop::Error);
}
