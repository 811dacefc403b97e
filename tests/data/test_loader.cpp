#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "data/loader.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "temp_dir.h"

using namespace mop::data;
using mop::data::testing::expect_error_with;
using mop::data::testing::TempDir;

namespace {

// Token i is i, so every window identifies itself by its first token.
std::vector<int32_t> counting(int n) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) t[size_t(i)] = i;
  return t;
}

bool same(const Batch& a, const Batch& b) {
  return a.rows == b.rows && a.seq_len == b.seq_len && a.inputs == b.inputs &&
         a.targets == b.targets && a.positions == b.positions && a.cu_seqlens == b.cu_seqlens;
}

}  // namespace

TEST(Loader, EpochVisitsEveryWindowOnceAndCoversTheStream) {
  const int T = 10, L = 1005;  // (1005 - 1) / 10 = 100 windows; the last 4 tokens unused
  Loader ld(TokenStream::from_tokens(counting(L), L), T, 5);
  EXPECT_EQ(ld.num_tokens(), uint64_t(L));
  ASSERT_EQ(ld.num_windows(), 100u);

  std::vector<int> visits(100, 0), target_hits(L, 0);
  Batch b;
  for (int step = 0; step < 25; ++step) {  // 25 batches of 4 rows = one epoch
    ld.next_batch(4, b);
    ASSERT_EQ(b.inputs.size(), 40u);
    for (int r = 0; r < 4; ++r) {
      const int first = b.inputs[size_t(r * T)];
      ASSERT_EQ(first % T, 0);
      ++visits[size_t(first / T)];
      for (int t = 0; t < T; ++t) {
        EXPECT_EQ(b.inputs[size_t(r * T + t)], first + t);
        EXPECT_EQ(b.targets[size_t(r * T + t)], first + t + 1);
        ++target_hits[size_t(first + t + 1)];
      }
    }
  }
  for (int w = 0; w < 100; ++w) EXPECT_EQ(visits[size_t(w)], 1) << "window " << w;
  // Every token from 1 to 1000 is a target exactly once; nothing past the last window is.
  for (int i = 0; i < L; ++i) EXPECT_EQ(target_hits[size_t(i)], (i >= 1 && i <= 1000) ? 1 : 0);
  EXPECT_EQ(ld.cursor(), (Cursor{0, 100}));

  ld.next_batch(1, b);  // rolls into epoch 1, in a new order
  EXPECT_EQ(ld.cursor(), (Cursor{1, 1}));
  EXPECT_NE(ld.epoch_order(0), ld.epoch_order(1));
  EXPECT_EQ(b.inputs[0], int32_t(ld.epoch_order(1)[0] * T));
}

TEST(Loader, DeterministicFromSeed) {
  auto run = [](uint64_t seed) {
    Loader ld(TokenStream::from_tokens(counting(2001), 2001), 16, seed);
    std::vector<int32_t> firsts;
    Batch b;
    for (int i = 0; i < 20; ++i) {
      ld.next_batch(3, b);
      firsts.insert(firsts.end(), b.inputs.begin(), b.inputs.end());
    }
    return firsts;
  };
  EXPECT_EQ(run(11), run(11));
  EXPECT_NE(run(11), run(12));
}

TEST(Loader, CursorResumeIsBitIdentical) {
  const auto toks = counting(331);  // 33 windows of 10: batches of 4 straddle epochs
  Loader a(TokenStream::from_tokens(toks, 331), 10, 99);
  Batch b;
  for (int i = 0; i < 7; ++i) a.next_batch(4, b);
  const nlohmann::json saved = a.cursor();  // as a checkpoint would store it
  std::vector<Batch> want(12);
  for (auto& w : want) a.next_batch(4, w);

  Loader r(TokenStream::from_tokens(toks, 331), 10, 99);
  r.next_batch(2, b);  // a different position, overwritten by the restore
  r.set_cursor(saved.get<Cursor>());
  EXPECT_EQ(r.cursor(), (Cursor{0, 28}));
  for (size_t i = 0; i < want.size(); ++i) {
    Batch got;
    r.next_batch(4, got);
    EXPECT_TRUE(same(got, want[i])) << "batch " << i << " after resume";
  }
  EXPECT_EQ(r.cursor(), a.cursor());

  expect_error_with([&] { r.set_cursor(Cursor{0, 34}); }, {"34", "33 windows"});
  EXPECT_THROW(nlohmann::json({{"epoch", 1}}).get<Cursor>(), mop::Error);
  EXPECT_THROW(nlohmann::json({{"epoch", -1}, {"index", 0}}).get<Cursor>(), mop::Error);
}

TEST(Loader, DocumentBoundariesAndPositions) {
  const int32_t B = kBos, E = kEos;
  // index:  0  1    2    3  4  5    6    7    8    9  10 11   12 13 14   15   16
  std::vector<int32_t> s = {B, 'a', 'b', E, B, 'c', 'd', 'e', 'f', E, B, 'g', E, B, 'h', 'i', E};
  Loader ld(TokenStream::from_tokens(s, kByteVocab), 8, 3);
  ASSERT_EQ(ld.num_windows(), 2u);
  const bool w0_first = ld.epoch_order(0)[0] == 0;
  Batch b;
  ld.next_batch(2, b);
  EXPECT_EQ(b.rows, 2);
  EXPECT_EQ(b.seq_len, 8);

  // Window 0: inputs B a b E | B c d e; documents start at 0 and 4 (BOS at 0 is not
  // counted twice). Window 1: inputs f E | B g E | B h i; a row always starts a document.
  const std::vector<int32_t> in0 = {B, 'a', 'b', E, B, 'c', 'd', 'e'};
  const std::vector<int32_t> tg0 = {'a', 'b', E, B, 'c', 'd', 'e', 'f'};
  const std::vector<int32_t> pos0 = {0, 1, 2, 3, 0, 1, 2, 3};
  const std::vector<int32_t> in1 = {'f', E, B, 'g', E, B, 'h', 'i'};
  const std::vector<int32_t> tg1 = {E, B, 'g', E, B, 'h', 'i', E};
  const std::vector<int32_t> pos1 = {0, 1, 0, 1, 2, 0, 1, 2};
  auto cat = [](std::vector<int32_t> x, const std::vector<int32_t>& y) {
    x.insert(x.end(), y.begin(), y.end());
    return x;
  };
  if (w0_first) {
    EXPECT_EQ(b.inputs, cat(in0, in1));
    EXPECT_EQ(b.targets, cat(tg0, tg1));
    EXPECT_EQ(b.positions, cat(pos0, pos1));
    EXPECT_EQ(b.cu_seqlens, (std::vector<int32_t>{0, 4, 8, 10, 13, 16}));
  } else {
    EXPECT_EQ(b.inputs, cat(in1, in0));
    EXPECT_EQ(b.targets, cat(tg1, tg0));
    EXPECT_EQ(b.positions, cat(pos1, pos0));
    EXPECT_EQ(b.cu_seqlens, (std::vector<int32_t>{0, 2, 5, 8, 12, 16}));
  }
}

TEST(Loader, TooLittleData) {
  expect_error_with(
      [] { Loader ld(TokenStream::from_tokens(counting(100), 259), 256, 1); },
      {"data has 100 tokens, fewer than seq_len + 1 = 257"});
  Loader one(TokenStream::from_tokens(counting(257), 259), 256, 1);  // exactly one window
  EXPECT_EQ(one.num_windows(), 1u);
}

TEST(Loader, ShardDirectoryMatchesInMemory) {
  TempDir dir;
  std::vector<std::string> docs;
  for (int i = 0; i < 40; ++i) docs.push_back("document number " + std::to_string(i * 7919));
  const std::vector<int32_t> toks = tokenize_documents(docs);
  // Three shards of uneven size so windows cross shard boundaries, plus files that the
  // prefix scan must skip.
  const size_t a = toks.size() / 5, c = toks.size() * 3 / 4;
  write_shard(dir.file("train_000000.bin"), {toks.begin(), toks.begin() + long(a)});
  write_shard(dir.file("train_000001.bin"), {toks.begin() + long(a), toks.begin() + long(c)});
  write_shard(dir.file("train_000002.bin"), {toks.begin() + long(c), toks.end()});
  write_shard(dir.file("val_000000.bin"), {1, 2, 3});
  dir.write("train_000003.bin.tmp", "partial");

  Loader from_files(TokenStream::from_dir(dir.path(), "train_", kByteVocab), 32, 8);
  Loader in_memory(TokenStream::from_tokens(toks, kByteVocab), 32, 8);
  EXPECT_EQ(from_files.num_tokens(), toks.size());
  EXPECT_EQ(from_files.num_windows(), in_memory.num_windows());
  Batch x, y;
  for (int i = 0; i < 10; ++i) {
    from_files.next_batch(5, x);
    in_memory.next_batch(5, y);
    ASSERT_TRUE(same(x, y)) << "batch " << i;
    EXPECT_EQ(x.cu_seqlens.front(), 0);
    EXPECT_EQ(x.cu_seqlens.back(), 5 * 32);
    for (size_t k = 1; k < x.cu_seqlens.size(); ++k) EXPECT_LT(x.cu_seqlens[k - 1], x.cu_seqlens[k]);
  }

  // A mixed stream (shard then memory) reads straight across the boundary.
  TokenStream mixed(kByteVocab);
  mixed.add_shard(dir.file("val_000000.bin"));
  mixed.add_tokens({4, 5});
  std::vector<int32_t> got(4);
  mixed.read(1, 4, got.data());
  EXPECT_EQ(got, (std::vector<int32_t>{2, 3, 4, 5}));
}

TEST(Loader, ConstructionValidates) {
  TempDir dir;
  write_shard(dir.file("train_000000.bin"), {kBos, 'a', kEos});
  std::vector<int32_t> bad(20, 'x');
  bad[17] = 300;
  write_shard(dir.file("train_000001.bin"), bad);
  expect_error_with([&] { TokenStream::from_dir(dir.path(), "train_", kByteVocab); },
                    {dir.file("train_000001.bin"), "token 300 at token index 17 (byte offset 66)",
                     "vocabulary of 259"});
  expect_error_with([&] { TokenStream::from_dir(dir.path(), "test_", kByteVocab); },
                    {dir.path(), "test_*.bin"});
  expect_error_with([&] { TokenStream::from_tokens({1, 259}, kByteVocab); },
                    {"token 259 at token index 1"});
}
