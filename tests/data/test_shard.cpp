#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "data/shard.h"
#include "temp_dir.h"

using namespace mop::data;
using mop::data::testing::expect_error_with;
using mop::data::testing::read_bytes;
using mop::data::testing::TempDir;

namespace {

std::vector<int32_t> iota_tokens(int n, int mod) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) t[size_t(i)] = (i * 37 + 11) % mod;
  return t;
}

// Overwrites 4 bytes at offset with a little-endian uint32.
std::string patch_u32(std::string bytes, size_t offset, uint32_t v) {
  std::memcpy(bytes.data() + offset, &v, 4);
  return bytes;
}

}  // namespace

TEST(Shard, RoundTripUint16) {
  TempDir dir;
  std::vector<int32_t> toks = iota_tokens(1000, 259);
  toks.push_back(65535);  // largest value that still fits uint16
  const std::string p = dir.file("a.bin");
  write_shard(p, toks);
  EXPECT_FALSE(std::filesystem::exists(p + ".tmp"));
  const std::string bytes = read_bytes(p);
  ASSERT_EQ(bytes.size(), 32 + 2 * toks.size());
  EXPECT_EQ(bytes.substr(0, 8), "MOPTOKS1");

  ShardView v(p);
  EXPECT_EQ(v.dtype(), kShardDtypeU16);
  EXPECT_EQ(v.elem_size(), 2u);
  ASSERT_EQ(v.size(), toks.size());
  for (size_t i = 0; i < toks.size(); ++i) ASSERT_EQ(v.token(i), toks[i]) << i;
  std::vector<int32_t> mid(10);
  v.read(500, 10, mid.data());
  EXPECT_TRUE(std::equal(mid.begin(), mid.end(), toks.begin() + 500));
  EXPECT_THROW(v.token(toks.size()), mop::Error);
  EXPECT_THROW(v.read(toks.size() - 2, 3, mid.data()), mop::Error);
}

TEST(Shard, RoundTripUint32) {
  TempDir dir;
  std::vector<int32_t> toks = {0, 1, 65536, 1 << 30, 259, 70000};
  const std::string p = dir.file("b.bin");
  write_shard(p, toks);
  EXPECT_EQ(read_bytes(p).size(), 32 + 4 * toks.size());
  ShardView v(p);
  EXPECT_EQ(v.dtype(), kShardDtypeU32);
  ASSERT_EQ(v.size(), toks.size());
  std::vector<int32_t> all(toks.size());
  v.read(0, toks.size(), all.data());
  EXPECT_EQ(all, toks);
  v.validate_vocab((1 << 30) + 1);
  // uint32 elements: token index 3 sits at byte offset 32 + 3 * 4.
  expect_error_with([&] { v.validate_vocab(70000); },
                    {p, "token 1073741824 at token index 3 (byte offset 44)",
                     "vocabulary of 70000"});
}

TEST(Shard, EmptyShardAndMoves) {
  TempDir dir;
  write_shard(dir.file("e.bin"), {});
  ShardView e(dir.file("e.bin"));
  EXPECT_EQ(e.size(), 0u);
  e.validate_vocab(1);

  write_shard(dir.file("m.bin"), {5, 6, 7});
  ShardView a(dir.file("m.bin"));
  ShardView b(std::move(a));
  EXPECT_EQ(b.token(2), 7);
  e = std::move(b);  // unmaps the empty shard, takes over the mapping
  EXPECT_EQ(e.size(), 3u);
  EXPECT_EQ(e.token(0), 5);
  EXPECT_EQ(e.path(), dir.file("m.bin"));
}

TEST(Shard, WriteRejectsNegativeTokens) {
  TempDir dir;
  expect_error_with([&] { write_shard(dir.file("n.bin"), {1, -3}); }, {"-3", "index 1"});
}

TEST(Shard, MissingFile) {
  TempDir dir;
  const std::string p = dir.file("nope.bin");
  expect_error_with([&] { ShardView v(p); }, {p, "cannot open"});
}

TEST(Shard, ShorterThanHeader) {
  TempDir dir;
  const std::string p = dir.write("short.bin", std::string("MOPTOKS1\x01\x00", 10));
  expect_error_with([&] { ShardView v(p); }, {p, "10 bytes", "32-byte header"});
}

TEST(Shard, WrongMagic) {
  TempDir dir;
  write_shard(dir.file("ok.bin"), {1, 2, 3});
  std::string bytes = read_bytes(dir.file("ok.bin"));
  bytes.replace(0, 8, "GGUFv3\x00\x01", 8);
  const std::string p = dir.write("magic.bin", bytes);
  expect_error_with([&] { ShardView v(p); }, {p, "wrong magic", "GGUFv3\\x00\\x01", "MOPTOKS1"});
}

TEST(Shard, BadVersionAndDtype) {
  TempDir dir;
  write_shard(dir.file("ok.bin"), {1, 2, 3});
  const std::string bytes = read_bytes(dir.file("ok.bin"));
  const std::string pv = dir.write("ver.bin", patch_u32(bytes, 8, 7));
  expect_error_with([&] { ShardView v(pv); }, {pv, "unknown version 7", "version 1"});
  const std::string pd = dir.write("dtype.bin", patch_u32(bytes, 12, 3));
  expect_error_with([&] { ShardView v(pd); }, {pd, "unknown dtype 3"});
}

TEST(Shard, Truncated) {
  TempDir dir;
  write_shard(dir.file("ok.bin"), iota_tokens(10, 259));  // 32 + 20 = 52 bytes
  const std::string bytes = read_bytes(dir.file("ok.bin"));
  ASSERT_EQ(bytes.size(), 52u);
  const std::string p = dir.write("trunc.bin", bytes.substr(0, 47));
  expect_error_with([&] { ShardView v(p); },
                    {p, "truncated", "10 tokens of 2 bytes", "byte offset 52", "expected 52 bytes",
                     "file is 47 bytes", "5 bytes missing"});
}

TEST(Shard, TrailingBytes) {
  TempDir dir;
  write_shard(dir.file("ok.bin"), iota_tokens(10, 259));
  const std::string p = dir.write("trail.bin", read_bytes(dir.file("ok.bin")) + "xyz");
  expect_error_with([&] { ShardView v(p); },
                    {p, "3 trailing bytes", "byte offset 52", "expected 52 bytes",
                     "file is 55 bytes"});
}

TEST(Shard, AbsurdCountDoesNotOverflow) {
  TempDir dir;
  write_shard(dir.file("ok.bin"), {1, 2});
  std::string bytes = read_bytes(dir.file("ok.bin"));
  const uint64_t huge = ~uint64_t(0) - 3;
  std::memcpy(bytes.data() + 16, &huge, 8);
  const std::string p = dir.write("huge.bin", bytes);
  expect_error_with([&] { ShardView v(p); }, {p, std::to_string(huge), "file is 36 bytes"});
}

TEST(Shard, OutOfVocabToken) {
  TempDir dir;
  std::vector<int32_t> toks = iota_tokens(40, 259);
  toks[17] = 300;
  toks[30] = 400;  // only the first offender is reported
  const std::string p = dir.file("vocab.bin");
  write_shard(p, toks);
  ShardView v(p);  // opening is fine: the header and size are valid
  expect_error_with([&] { v.validate_vocab(259); },
                    {"file " + p + ": token 300 at token index 17 (byte offset 66) is outside "
                                   "the vocabulary of 259"});
  v.validate_vocab(401);
}
