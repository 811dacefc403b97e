// GlooGroup: W ranks as threads of one process, rendezvous through a FileStore temp directory.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "parallel/gloo_group.h"
#include "rank_threads.h"

namespace mop {
namespace {

struct TempDir {
  std::string path;
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "mop_gloo_XXXXXX").string();
    char* p = mkdtemp(tmpl.data());
    if (!p) throw std::runtime_error("mkdtemp failed");
    path = p;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

GlooOptions options(const std::string& dir, const std::string& prefix,
                    std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
  GlooOptions o;
  o.store_dir = dir;
  o.prefix = prefix;
  o.timeout = timeout;  // short, so that a broken test fails instead of hanging
  return o;
}

// Runs fn(group) on W threads, one GlooGroup each; collects the failures of all ranks.
void run_ranks(int W, const std::function<void(GlooGroup&)>& fn, const std::string& prefix = "t") {
  TempDir dir;
  test::run_rank_threads(W, [&](int r) {
    GlooGroup g(r, W, options(dir.path, prefix));
    fn(g);
  });
}

class GlooGroupTest : public ::testing::TestWithParam<int> {};

template <class T> void check_all_reduce(GlooGroup& g, size_t n) {
  const int W = g.size(), r = g.rank();
  std::vector<T> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = T(r * 1000 + int64_t(i));
  g.all_reduce_sum(v.data(), n);
  for (size_t i = 0; i < n; ++i) {
    T want = T(1000 * W * (W - 1) / 2 + int64_t(W) * int64_t(i));
    if (v[i] != want) {
      ADD_FAILURE() << "rank " << r << " all_reduce element " << i << ": " << v[i] << " != " << want;
      return;
    }
  }
}

TEST_P(GlooGroupTest, AllReduceSumAllTypes) {
  run_ranks(GetParam(), [](GlooGroup& g) {
    EXPECT_EQ(g.name(), "t");
    check_all_reduce<float>(g, 1000);
    check_all_reduce<double>(g, 7);
    check_all_reduce<int32_t>(g, 1);
    check_all_reduce<int64_t>(g, 300'000);  // several gloo segments
    check_all_reduce<float>(g, 0);
  });
}

TEST_P(GlooGroupTest, AllGather) {
  run_ranks(GetParam(), [](GlooGroup& g) {
    const int W = g.size(), r = g.rank();
    for (size_t n : {size_t(1), size_t(513)}) {
      std::vector<int64_t> in(n), out(n * W, -1);
      for (size_t i = 0; i < n; ++i) in[i] = r * 1000 + int64_t(i);
      g.all_gather(in.data(), n, out.data());
      for (int s = 0; s < W; ++s)
        for (size_t i = 0; i < n; ++i)
          ASSERT_EQ(out[s * n + i], s * 1000 + int64_t(i)) << "rank " << r << " row " << s;
    }
    std::vector<float> fin(3, float(r)), fout(3 * W);
    g.all_gather(fin.data(), 3, fout.data());
    for (int s = 0; s < W; ++s) EXPECT_EQ(fout[s * 3 + 2], float(s));
  });
}

TEST_P(GlooGroupTest, ReduceScatterSum) {
  run_ranks(GetParam(), [](GlooGroup& g) {
    const int W = g.size(), r = g.rank();
    const size_t n = 37;
    std::vector<double> in(n * W), out(n, -1);
    for (int p = 0; p < W; ++p)
      for (size_t i = 0; i < n; ++i) in[p * n + i] = r * 1000 + p * 100 + double(i);
    g.reduce_scatter_sum(in.data(), out.data(), n);
    for (size_t i = 0; i < n; ++i)
      ASSERT_EQ(out[i], 1000.0 * W * (W - 1) / 2 + W * (r * 100 + double(i))) << "rank " << r;
  });
}

TEST_P(GlooGroupTest, BroadcastFromNonZeroRoot) {
  run_ranks(GetParam(), [](GlooGroup& g) {
    const int W = g.size(), r = g.rank();
    const int root = W - 1;
    std::vector<int32_t> v(100, -1);
    if (r == root)
      for (int i = 0; i < 100; ++i) v[i] = root * 1000 + i;
    g.broadcast(v.data(), v.size(), root);
    for (int i = 0; i < 100; ++i) ASSERT_EQ(v[i], root * 1000 + i) << "rank " << r;
    EXPECT_THROW(g.broadcast(v.data(), v.size(), W), Error);  // checked before any gloo call
  });
}

// Element j of the row that rank s sends to rank p.
int64_t a2a_value(int s, int p, size_t j) { return s * 1000 + p * 100 + int64_t(j); }

void check_all_to_all(GlooGroup& g, const std::function<size_t(int from, int to)>& count) {
  const int W = g.size(), r = g.rank();
  std::vector<size_t> sc(W), rc(W);
  size_t ns = 0, nr = 0;
  for (int p = 0; p < W; ++p) {
    sc[p] = count(r, p);
    rc[p] = count(p, r);
    ns += sc[p];
    nr += rc[p];
  }
  std::vector<int64_t> in, out(nr, -1);
  for (int p = 0; p < W; ++p)
    for (size_t j = 0; j < sc[p]; ++j) in.push_back(a2a_value(r, p, j));
  g.all_to_all_v(in.data(), sc, out.data(), rc);
  size_t k = 0;
  for (int s = 0; s < W; ++s)
    for (size_t j = 0; j < rc[s]; ++j, ++k)
      ASSERT_EQ(out[k], a2a_value(s, r, j)) << "rank " << r << " from " << s << " elem " << j;
  (void)ns;
}

TEST_P(GlooGroupTest, AllToAllV) {
  run_ranks(GetParam(), [](GlooGroup& g) {
    const int W = g.size();
    // Uneven, some pairs 0 (including some self pairs).
    check_all_to_all(g, [](int s, int p) { return size_t((s + 2 * p) % 3) * 5; });
    // Everyone sends everything to rank 0, nothing elsewhere.
    check_all_to_all(g, [](int s, int p) { return p == 0 ? size_t(1000 + 17 * s) : 0; });
    // All counts zero; null pointers allowed.
    std::vector<size_t> zero(W, 0);
    g.all_to_all_v<float>(nullptr, zero, nullptr, zero);
    // Equal counts, large.
    check_all_to_all(g, [](int, int) { return size_t(20'000); });
    // Wrong number of counts is rejected before any communication.
    EXPECT_THROW(g.all_to_all_v<float>(nullptr, std::vector<size_t>(W + 1), nullptr, zero), Error);
  });
}

TEST_P(GlooGroupTest, BarrierAndMixedSequence) {
  std::atomic<int> arrived{0};
  run_ranks(GetParam(), [&](GlooGroup& g) {
    const int W = g.size(), r = g.rank();
    for (int round = 1; round <= 3; ++round) {
      arrived.fetch_add(1);
      g.barrier();
      EXPECT_GE(arrived.load(), round * W) << "rank " << r << " left barrier " << round << " early";
      g.barrier();  // nobody starts the next round before everyone has checked
    }
    // Different collectives back to back on one group.
    int64_t x = r;
    g.all_reduce_sum(&x, 1);
    EXPECT_EQ(x, W * (W - 1) / 2);
    float b = r == 0 ? 3.5f : 0.f;
    g.broadcast(&b, 1, 0);
    EXPECT_EQ(b, 3.5f);
    std::vector<int32_t> all(W);
    int32_t me = r * 1000;
    g.all_gather(&me, 1, all.data());
    for (int s = 0; s < W; ++s) EXPECT_EQ(all[s], s * 1000);
  });
}

TEST_P(GlooGroupTest, TwoGroupsShareOneStoreDirectory) {
  const int W = GetParam();
  TempDir dir;
  std::vector<std::thread> threads;
  std::mutex mu;
  std::vector<std::string> errors;
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      try {
        GlooGroup a(r, W, options(dir.path, "world"));
        GlooGroup b(r, W, options(dir.path, "other"));
        int32_t xa = r + 1, xb = 10 * (r + 1);
        b.all_reduce_sum(&xb, 1);
        a.all_reduce_sum(&xa, 1);
        EXPECT_EQ(xa, W * (W + 1) / 2);
        EXPECT_EQ(xb, 10 * W * (W + 1) / 2);
        EXPECT_EQ(b.name(), "other");
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(mu);
        errors.push_back(e.what());
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) ADD_FAILURE() << e;
}

INSTANTIATE_TEST_SUITE_P(World, GlooGroupTest, ::testing::Values(2, 4),
                         [](const auto& info) { return "W" + std::to_string(info.param); });

TEST(GlooGroup, SingleRank) {
  TempDir dir;
  GlooGroup g(0, 1, options(dir.path, "solo"));
  float v[3] = {1, 2, 3};
  g.all_reduce_sum(v, 3);
  EXPECT_EQ(v[2], 3.f);
  float out[3];
  g.all_gather(v, 3, out);
  g.reduce_scatter_sum(v, out, 3);
  EXPECT_EQ(out[1], 2.f);
  g.all_to_all_v(v, {3}, out, {3});
  EXPECT_EQ(out[0], 1.f);
  g.broadcast(v, 3, 0);
  g.barrier();
}

TEST(GlooGroup, MissingStoreDirectoryIsAnError) {
  EXPECT_THROW(GlooGroup(0, 2, options("/nonexistent/mop_gloo", "x")), Error);
}

TEST(GlooGroup, CollectiveTimesOutWhenAPeerNeverJoins) {
  TempDir dir;
  std::promise<void> rank0_done;
  std::shared_future<void> done = rank0_done.get_future().share();
  std::string rank1_error;
  std::thread rank1([&] {
    try {
      GlooGroup g(1, 2, options(dir.path, "to", std::chrono::seconds(2)));
      done.wait();  // never joins the all_reduce; keeps its end open until rank 0 is done
    } catch (const std::exception& e) {
      rank1_error = e.what();
    }
  });
  std::string msg;
  double secs = 0;
  try {
    GlooGroup g(0, 2, options(dir.path, "to", std::chrono::seconds(2)));
    std::vector<float> v(16, 1.f);
    auto t0 = std::chrono::steady_clock::now();
    try {
      g.all_reduce_sum(v.data(), v.size());
    } catch (const Error& e) {
      msg = e.what();
    }
    secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!msg.empty()) {
      // The group is broken now: the next collective fails at once, naming the first failure.
      try {
        g.barrier();
        ADD_FAILURE() << "barrier on a broken group did not throw";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("all_reduce_sum"), std::string::npos) << e.what();
      }
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << "rank 0: " << e.what();
  }
  rank0_done.set_value();
  rank1.join();
  EXPECT_EQ(rank1_error, "");
  ASSERT_FALSE(msg.empty()) << "all_reduce did not throw";
  EXPECT_NE(msg.find("timed out"), std::string::npos) << msg;
  EXPECT_NE(msg.find("2000 ms"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'to'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("all_reduce_sum"), std::string::npos) << msg;
  EXPECT_GE(secs, 1.5);
  EXPECT_LT(secs, 10.0);
}

}  // namespace
}  // namespace mop
