#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "checkpoint/atomic_dir.h"
#include "checkpoint/safetensors.h"
#include "core/error.h"

using namespace mop;
using namespace mop::ckpt;
namespace fs = std::filesystem;

namespace {

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/mop_ad_XXXXXX";
    char* p = ::mkdtemp(tmpl);
    if (!p) throw std::runtime_error("mkdtemp failed");
    path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void write_file(const std::string& path, const std::string& s) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << s;
  if (!f) throw std::runtime_error("cannot write " + path);
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// Sorted names of the entries of a directory.
std::vector<std::string> listing(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

// Restores the default replacement strategy when a test ends.
struct ForceTwoRenames {
  explicit ForceTwoRenames(bool on) { detail::set_atomic_dir_force_two_renames(on); }
  ~ForceTwoRenames() { detail::set_atomic_dir_force_two_renames(false); }
};

}  // namespace

TEST(AtomicDir, CommitPublishes) {
  TempDir root;
  std::string final_path = root.file("step_000100");
  AtomicDir d(final_path);
  EXPECT_EQ(d.final_path(), final_path);
  EXPECT_EQ(d.temp_path().rfind(final_path + ".tmp-", 0), 0u) << d.temp_path();
  EXPECT_TRUE(fs::is_directory(d.temp_path()));
  EXPECT_EQ(d.path("a.txt"), d.temp_path() + "/a.txt");
  write_file(d.path("a.txt"), "hello");
  write_file(d.path("b.bin"), std::string(1000, 'x'));
  EXPECT_FALSE(fs::exists(final_path));  // nothing under the final name before commit

  d.commit();
  EXPECT_TRUE(d.committed());
  EXPECT_EQ(listing(root.path()), std::vector<std::string>{"step_000100"});
  EXPECT_EQ(listing(final_path), (std::vector<std::string>{"a.txt", "b.bin"}));
  EXPECT_EQ(read_file(final_path + "/a.txt"), "hello");
  EXPECT_THROW(d.commit(), Error);
  EXPECT_THROW(d.path("c.txt"), Error);
}

TEST(AtomicDir, TwoDirsForTheSameNameGetDistinctTemps) {
  TempDir root;
  AtomicDir a(root.file("c"));
  AtomicDir b(root.file("c"));
  EXPECT_NE(a.temp_path(), b.temp_path());
}

class AtomicDirReplace : public ::testing::TestWithParam<bool> {};

TEST_P(AtomicDirReplace, ReplacesAnExistingDirectoryWithoutLeftovers) {
  ForceTwoRenames mode(GetParam());
  TempDir root;
  std::string final_path = root.file("ckpt");
  {
    AtomicDir d(final_path);
    write_file(d.path("old.txt"), "old");
    fs::create_directory(d.temp_path() + "/sub");  // nested content is synced and removed too
    write_file(d.temp_path() + "/sub/deep.txt", "deep");
    d.commit();
  }
  ASSERT_EQ(read_file(final_path + "/old.txt"), "old");
  {
    AtomicDir d(final_path);
    write_file(d.path("new.txt"), "new");
    d.commit();
  }
  EXPECT_EQ(listing(final_path), std::vector<std::string>{"new.txt"});
  EXPECT_EQ(read_file(final_path + "/new.txt"), "new");
  EXPECT_EQ(listing(root.path()), std::vector<std::string>{"ckpt"});  // no .old-* / .tmp-* siblings
}

INSTANTIATE_TEST_SUITE_P(Strategies, AtomicDirReplace, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "TwoRenames" : "Exchange"; });

TEST(AtomicDir, DestroyedWithoutCommitKeepsThePreviousDirectory) {
  TempDir root;
  std::string final_path = root.file("ckpt");
  {
    AtomicDir d(final_path);
    write_file(d.path("model.txt"), "v1");
    d.commit();
  }
  std::string tmp;
  {
    AtomicDir d(final_path);
    tmp = d.temp_path();
    write_file(d.path("model.txt"), "v2-partial");
    EXPECT_TRUE(fs::exists(tmp));
  }
  EXPECT_FALSE(fs::exists(tmp));
  EXPECT_EQ(read_file(final_path + "/model.txt"), "v1");
  EXPECT_EQ(listing(root.path()), std::vector<std::string>{"ckpt"});

  // The same when an exception unwinds a half-written checkpoint.
  try {
    AtomicDir d(final_path);
    tmp = d.temp_path();
    write_file(d.path("model.txt"), "v3-partial");
    throw std::runtime_error("crash mid-write");
  } catch (const std::runtime_error&) {
  }
  EXPECT_FALSE(fs::exists(tmp));
  EXPECT_EQ(read_file(final_path + "/model.txt"), "v1");
  EXPECT_EQ(listing(root.path()), std::vector<std::string>{"ckpt"});

  // And when nothing was published before: no directory under the final name at all.
  {
    AtomicDir d(root.file("never"));
    write_file(d.path("x"), "x");
  }
  EXPECT_EQ(listing(root.path()), std::vector<std::string>{"ckpt"});
}

TEST(AtomicDir, MoveTransfersOwnership) {
  TempDir root;
  std::string tmp;
  {
    AtomicDir a(root.file("m"));
    tmp = a.temp_path();
    AtomicDir b(std::move(a));
    EXPECT_EQ(b.temp_path(), tmp);
    write_file(b.path("f"), "1");
    b.commit();
  }
  EXPECT_EQ(read_file(root.file("m/f")), "1");
  EXPECT_EQ(listing(root.path()), std::vector<std::string>{"m"});
}

TEST(AtomicDir, CreatesParentsAndIgnoresTrailingSlash) {
  TempDir root;
  AtomicDir d(root.file("run/checkpoints/step_1/"));
  EXPECT_EQ(d.final_path(), root.file("run/checkpoints/step_1"));
  write_file(d.path("f"), "1");
  d.commit();
  EXPECT_EQ(read_file(root.file("run/checkpoints/step_1/f")), "1");
  EXPECT_EQ(listing(root.file("run/checkpoints")), std::vector<std::string>{"step_1"});
}

TEST(AtomicDir, Errors) {
  TempDir root;
  write_file(root.file("plain"), "not a dir");
  std::string bad = root.file("plain/ckpt");
  try {
    AtomicDir d(bad);
    FAIL() << "expected mop::Error";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find(root.file("plain")), std::string::npos) << m;
    EXPECT_NE(m.find("Not a directory"), std::string::npos) << m;
  }
  AtomicDir d(root.file("ok"));
  EXPECT_THROW(d.path(""), Error);
  EXPECT_THROW(d.path("a/b"), Error);
  EXPECT_THROW(d.path(".."), Error);
}

TEST(AtomicDir, HoldsASafetensorsCheckpoint) {
  TempDir root;
  std::string final_path = root.file("step_2");
  std::vector<float> w = {1.f, 2.f, 3.f};
  {
    AtomicDir d(final_path);
    SafetensorsWriter wr;
    wr.add("w", DType::f32, {3}, w.data());
    wr.set_metadata("step", "2");
    wr.write(d.path("model.safetensors"));
    d.commit();
  }
  SafetensorsFile f(final_path + "/model.safetensors");
  std::vector<float> out(3);
  f.read_into("w", DType::f32, {3}, out.data());
  EXPECT_EQ(out, w);
  EXPECT_EQ(f.metadata().at("step"), "2");
}

TEST(AtomicDir, WriteTextFileAtomic) {
  TempDir root;
  std::string latest = root.file("latest");
  write_text_file_atomic(latest, "step_000100\n");
  EXPECT_EQ(read_file(latest), "step_000100\n");
  write_text_file_atomic(latest, "step_000200\n");
  EXPECT_EQ(read_file(latest), "step_000200\n");
  write_text_file_atomic(latest, "");
  EXPECT_EQ(read_file(latest), "");
  EXPECT_EQ(listing(root.path()), std::vector<std::string>{"latest"});  // no latest.tmp left

  std::string bad = root.file("no/such/dir/latest");
  try {
    write_text_file_atomic(bad, "x");
    FAIL() << "expected mop::Error";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find(bad + ".tmp"), std::string::npos) << m;
    EXPECT_NE(m.find("No such file or directory"), std::string::npos) << m;
  }
}
