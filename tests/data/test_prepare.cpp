#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include "data/prepare.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "temp_dir.h"

using namespace mop::data;
using mop::data::testing::expect_error_with;
using mop::data::testing::read_bytes;
using mop::data::testing::TempDir;
namespace fs = std::filesystem;

namespace {

// The documents stored in a shard, decoded back to text; fails the test when a document
// is not framed by BOS ... EOS (i.e. was split across shards).
std::vector<std::string> shard_docs(const std::string& path) {
  ShardView v(path);
  std::vector<int32_t> t(v.size());
  v.read(0, v.size(), t.data());
  std::vector<std::string> docs;
  ByteTokenizer tok;
  size_t i = 0;
  while (i < t.size()) {
    EXPECT_EQ(t[i], kBos) << path << " at " << i;
    size_t j = i + 1;
    while (j < t.size() && t[j] != kEos) ++j;
    EXPECT_LT(j, t.size()) << path << ": document without EOS";
    docs.push_back(tok.decode(std::span<const int32_t>(t.data() + i + 1, j - i - 1)));
    i = j + 1;
  }
  return docs;
}

std::vector<std::string> list(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

TEST(Prepare, SplitAtBlankLines) {
  const std::string text = "first line\nsecond line\n\n\n\nthird doc\n \t\r\n  fourth\r\n\n";
  std::vector<std::string> want = {"first line\nsecond line", "third doc", "  fourth\r"};
  EXPECT_EQ(split_documents(text), want);
  EXPECT_TRUE(split_documents("\n\n  \n").empty());
  EXPECT_EQ(split_documents("no newline"), std::vector<std::string>{"no newline"});
}

TEST(Prepare, ShardsValSplitAndLimits) {
  TempDir dir;
  std::vector<std::string> all;
  std::vector<std::string> files;
  for (int f = 0; f < 3; ++f) {
    std::string text;
    for (int d = 0; d < 8; ++d) {
      std::string doc = "file " + std::to_string(f) + " doc " + std::to_string(d);
      if (d % 3 == 0) doc += "\nwith a second line";
      all.push_back(doc);
      text += doc + (d % 2 ? "\n\n" : "\n\n\n");
    }
    files.push_back(dir.write("in" + std::to_string(f) + ".txt", text));
  }
  const std::string out = dir.file("out/nested");
  const size_t limit = 80;
  PrepareStats st = prepare_shards(files, out, 0.25, 42, limit);

  EXPECT_EQ(st.docs, 24u);
  EXPECT_EQ(st.train_docs + st.val_docs, 24u);
  EXPECT_GE(st.val_docs, 1u);
  EXPECT_GE(st.train_docs, 1u);
  EXPECT_EQ(st.train_tokens + st.val_tokens, st.tokens);
  EXPECT_EQ(st.val_shards, 1u);
  EXPECT_GT(st.train_shards, 2u);  // the limit forces several shards

  std::vector<std::string> seen;
  uint64_t train_tokens = 0;
  for (uint64_t s = 0; s < st.train_shards; ++s) {
    const std::string p = out + fmt::format("/train_{:06d}.bin", s);
    ShardView v(p);
    EXPECT_LE(v.size(), limit) << p;
    train_tokens += v.size();
    for (auto& d : shard_docs(p)) seen.push_back(d);
  }
  EXPECT_EQ(train_tokens, st.train_tokens);
  EXPECT_EQ(seen.size(), st.train_docs);
  std::vector<std::string> val = shard_docs(out + "/val_000000.bin");
  EXPECT_EQ(val.size(), st.val_docs);
  seen.insert(seen.end(), val.begin(), val.end());
  std::sort(seen.begin(), seen.end());
  std::sort(all.begin(), all.end());
  EXPECT_EQ(seen, all);  // every document exactly once, intact

  // Same inputs and seed: byte-identical output. Another seed: another split.
  prepare_shards(files, dir.file("again"), 0.25, 42, limit);
  EXPECT_EQ(list(dir.file("again")), list(out));
  for (const auto& n : list(out))
    EXPECT_EQ(read_bytes(out + "/" + n), read_bytes(dir.file("again/" + n))) << n;
  bool differs = false;
  for (uint64_t seed = 1; seed < 6 && !differs; ++seed) {
    prepare_shards(files, dir.file("other"), 0.25, seed, limit);
    differs = read_bytes(dir.file("other/val_000000.bin")) != read_bytes(out + "/val_000000.bin");
  }
  EXPECT_TRUE(differs);
}

TEST(Prepare, AtLeastOneValAndNoValWhenZero) {
  TempDir dir;
  const std::string f = dir.write("two.txt", "alpha\n\nbeta\n");
  PrepareStats st = prepare_shards({f}, dir.file("o1"), 1e-9, 3, 1000);
  EXPECT_EQ(st.val_docs, 1u);
  EXPECT_EQ(st.train_docs, 1u);
  EXPECT_TRUE(fs::exists(dir.file("o1/val_000000.bin")));

  PrepareStats none = prepare_shards({f}, dir.file("o2"), 0.0, 3, 1000);
  EXPECT_EQ(none.val_docs, 0u);
  EXPECT_EQ(none.train_docs, 2u);
  EXPECT_EQ(list(dir.file("o2")), std::vector<std::string>{"train_000000.bin"});
}

TEST(Prepare, RemovesStaleShardsOnly) {
  TempDir dir;
  const std::string f = dir.write("t.txt", "alpha\n\nbeta\n");
  fs::create_directories(dir.file("o"));
  dir.write("o/train_000007.bin", "stale");
  dir.write("o/val_000003.bin.tmp", "stale");
  dir.write("o/notes.txt", "keep me");
  dir.write("o/train_7.bin", "not our name pattern");
  prepare_shards({f}, dir.file("o"), 0.0, 1, 1000);
  EXPECT_EQ(list(dir.file("o")), (std::vector<std::string>{"notes.txt", "train_000000.bin", "train_7.bin"}));
}

TEST(Prepare, Errors) {
  TempDir dir;
  const std::string ok = dir.write("ok.txt", "hello\n\nworld\n");
  const std::string missing = dir.file("missing.txt");
  expect_error_with([&] { prepare_shards({ok, missing}, dir.file("o"), 0.1, 1, 100); },
                    {missing});
  EXPECT_FALSE(fs::exists(dir.file("o")));  // nothing written when an input is bad

  const std::string big = dir.write("big.txt", std::string(50, 'x') + "\n\nsmall\n");
  expect_error_with([&] { prepare_shards({big}, dir.file("o"), 0.0, 1, 40); },
                    {"document 0", big, "52 tokens", "shard_tokens = 40"});

  const std::string blank = dir.write("blank.txt", "\n\n  \n");
  expect_error_with([&] { prepare_shards({blank}, dir.file("o"), 0.0, 1, 40); },
                    {"no documents"});
  EXPECT_THROW(prepare_shards({ok}, dir.file("o"), 1.5, 1, 40), mop::Error);
  EXPECT_THROW(prepare_shards({ok}, dir.file("o"), 0.1, 1, 0), mop::Error);
}
