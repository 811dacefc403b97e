// GlooGroup async collectives (one worker thread per group) and send/recv; ranks are threads
// sharing one TcpStore on an ephemeral port.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "parallel/gloo_group.h"
#include "parallel/rank_threads.h"
#include "parallel/solo_group.h"
#include "parallel/tcp_store.h"

namespace mop {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// Runs fn(group) on W threads; rank 0's TcpStore is the server.
void run_ranks(int W, const std::function<void(GlooGroup&)>& fn,
               std::chrono::milliseconds timeout = 20s) {
  auto server = std::make_shared<TcpStore>("127.0.0.1", 0, true, 20s);
  test::run_rank_threads(W, [&](int r) {
    GlooOptions o;
    o.store = r == 0 ? server : make_tcp_store("127.0.0.1", server->port(), false, 20s);
    o.prefix = "async";
    o.timeout = timeout;
    GlooGroup g(r, W, o);
    fn(g);
  });
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

TEST(GlooAsync, AllGatherOverlapsTheCaller) {
  run_ranks(2, [](GlooGroup& g) {
    const int r = g.rank();
    const size_t n = 1000;
    std::vector<int64_t> in(n), out(2 * n, -1);
    for (size_t i = 0; i < n; ++i) in[i] = r * 100000 + int64_t(i);
    if (r == 1) std::this_thread::sleep_for(400ms);  // rank 0's gather cannot finish before
    auto t0 = Clock::now();
    auto work = g.all_gather_async(in.data(), n, out.data());
    const double issue_s = seconds_since(t0);
    int64_t busy = 0;  // the caller's own work while the gather is pending
    bool pending_seen = false;
    if (r == 0) {
      pending_seen = !work->done();
      for (int i = 0; i < 1000000; ++i) busy += i % 7;
    }
    work->wait();
    EXPECT_TRUE(work->done());
    if (r == 0) {
      EXPECT_LT(issue_s, 0.2) << "all_gather_async blocked the caller";
      EXPECT_TRUE(pending_seen) << "the gather finished before rank 1 joined";
      EXPECT_GT(busy, 0);
    }
    for (int s = 0; s < 2; ++s)
      for (size_t i = 0; i < n; ++i)
        ASSERT_EQ(out[s * n + i], s * 100000 + int64_t(i)) << "rank " << r << " row " << s;
  });
}

// Several async operations in flight, then a blocking one queued behind them: all complete in
// call order with the right results, whatever the ranks' timing.
TEST(GlooAsync, ManyInFlightThenBlocking) {
  const int W = 3;
  run_ranks(W, [](GlooGroup& g) {
    const int r = g.rank();
    std::this_thread::sleep_for(std::chrono::milliseconds(50 * r));
    std::vector<float> ar(500, float(r + 1));
    std::vector<int32_t> gin(7, r), gout(7 * W, -1);
    std::vector<double> rsin(5 * W), rsout(5, -1);
    for (int p = 0; p < W; ++p)
      for (int i = 0; i < 5; ++i) rsin[p * 5 + i] = r * 100 + p * 10 + i;
    std::vector<size_t> sc(W), rc(W);
    for (int p = 0; p < W; ++p) {
      sc[p] = size_t(r + p);  // rank s sends s+p elements to rank p
      rc[p] = size_t(p + r);
    }
    std::vector<int64_t> a2a_in, a2a_out(size_t(W * r + W * (W - 1) / 2), -1);
    for (int p = 0; p < W; ++p)
      for (size_t j = 0; j < sc[p]; ++j) a2a_in.push_back(r * 1000 + p * 100 + int64_t(j));
    auto w1 = g.all_reduce_sum_async(ar.data(), ar.size());
    auto w2 = g.all_gather_async(gin.data(), gin.size(), gout.data());
    auto w3 = g.reduce_scatter_sum_async(rsin.data(), rsout.data(), 5);
    auto w4 = g.all_to_all_v_async(a2a_in.data(), sc, a2a_out.data(), rc);
    int64_t x = r;
    g.all_reduce_sum(&x, 1);  // blocking: runs after w1..w4
    EXPECT_TRUE(w1->done() && w2->done() && w3->done() && w4->done());
    EXPECT_EQ(x, W * (W - 1) / 2);
    w4->wait();
    w2->wait();
    w1->wait();
    w3->wait();
    EXPECT_EQ(ar[499], float(W * (W + 1) / 2));
    for (int s = 0; s < W; ++s) EXPECT_EQ(gout[s * 7 + 6], s);
    for (int i = 0; i < 5; ++i)
      EXPECT_EQ(rsout[i], 100.0 * W * (W - 1) / 2 + W * (r * 10 + i)) << "rank " << r;
    size_t k = 0;
    for (int s = 0; s < W; ++s)
      for (size_t j = 0; j < rc[s]; ++j, ++k)
        ASSERT_EQ(a2a_out[k], s * 1000 + r * 100 + int64_t(j)) << "rank " << r << " from " << s;
  });
}

TEST(GlooAsync, ArgumentErrorsComeOutOfWait) {
  run_ranks(2, [](GlooGroup& g) {
    std::vector<size_t> wrong(3, 0), right(2, 0);
    auto w = g.all_to_all_v_async<float>(nullptr, wrong, nullptr, right);
    EXPECT_TRUE(w->done());
    EXPECT_THROW(w->wait(), Error);
    int64_t x = 1;  // the group still works: the bad call never reached gloo
    g.all_reduce_sum(&x, 1);
    EXPECT_EQ(x, 2);
  });
}

TEST(GlooAsync, TimeoutComesOutOfWaitAndBreaksTheGroup) {
  std::promise<void> rank0_done;
  std::shared_future<void> done = rank0_done.get_future().share();
  run_ranks(
      2,
      [&](GlooGroup& g) {
        if (g.rank() == 1) {
          done.wait();  // never joins; keeps its end open until rank 0 has seen the timeout
          return;
        }
        std::vector<float> v(16, 1.f);
        auto t0 = Clock::now();
        auto w = g.all_reduce_sum_async(v.data(), v.size());
        EXPECT_LT(seconds_since(t0), 0.5);
        std::string msg;
        try {
          w->wait();
        } catch (const Error& e) {
          msg = e.what();
        }
        EXPECT_NE(msg.find("all_reduce_sum timed out"), std::string::npos) << msg;
        EXPECT_NE(msg.find("1000 ms"), std::string::npos) << msg;
        EXPECT_NE(msg.find("a peer rank exited or hung"), std::string::npos) << msg;
        EXPECT_THROW(w->wait(), Error);  // every wait() rethrows
        try {
          g.barrier();
          ADD_FAILURE() << "barrier on a broken group did not throw";
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("earlier failure"), std::string::npos) << e.what();
        }
        rank0_done.set_value();
      },
      1000ms);
}

TEST(GlooAsync, SoloGroupDefaultIsCompletedWork) {
  SoloGroup g("solo");
  double in[2] = {1.5, 2.5}, out[2] = {};
  auto w = g.reduce_scatter_sum_async(in, out, 2);
  EXPECT_TRUE(w->done());
  w->wait();
  EXPECT_EQ(out[1], 2.5);
  auto bad = g.all_to_all_v_async(in, {2}, out, {1});  // the error is stored, not thrown here
  EXPECT_THROW(bad->wait(), Error);
}

class SendRecv : public ::testing::TestWithParam<int> {};

// Ring: rank r sends to r+1 and receives from r-1; even ranks send first, odd ranks receive
// first, so every rendezvous send meets its recv.
TEST_P(SendRecv, Ring) {
  const int W = GetParam();
  run_ranks(W, [W](GlooGroup& g) {
    const int r = g.rank(), next = (r + 1) % W, prev = (r + W - 1) % W;
    for (size_t n : {size_t(1), size_t(300'000)}) {
      std::vector<int64_t> out(n), in(n, -1);
      for (size_t i = 0; i < n; ++i) out[i] = r * 1'000'000 + int64_t(i);
      if (r % 2 == 0) {
        g.send(out.data(), n, next, 5);
        g.recv(in.data(), n, prev, 5);
      } else {
        g.recv(in.data(), n, prev, 5);
        g.send(out.data(), n, next, 5);
      }
      for (size_t i = 0; i < n; ++i)
        ASSERT_EQ(in[i], prev * 1'000'000 + int64_t(i)) << "rank " << r << " n " << n;
    }
    // Two messages with one tag arrive in order; then a collective still lines up.
    if (r == 0) {
      float a = 1.f, b = 2.f;
      g.send(&a, 1, 1, 9);
      g.send(&b, 1, 1, 9);
    } else if (r == 1) {
      float a = 0, b = 0;
      g.recv(&a, 1, 0, 9);
      g.recv(&b, 1, 0, 9);
      EXPECT_EQ(a, 1.f);
      EXPECT_EQ(b, 2.f);
    }
    int32_t x = 1;
    g.all_reduce_sum(&x, 1);
    EXPECT_EQ(x, W);
    float dummy = 0;
    EXPECT_THROW(g.send(&dummy, 1, r, 0), Error);  // not to itself
    EXPECT_THROW(g.recv(&dummy, 1, W, 0), Error);
    EXPECT_THROW(g.send(&dummy, 1, next, -1), Error);
  });
}

INSTANTIATE_TEST_SUITE_P(World, SendRecv, ::testing::Values(2, 4),
                         [](const auto& info) { return "W" + std::to_string(info.param); });

}  // namespace
}  // namespace mop
