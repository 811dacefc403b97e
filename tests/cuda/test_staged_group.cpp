// StagedGroup (parallel.gpu_comm = host): two ranks as two threads sharing GPU 0, each with its own
// stream, over Gloo twins. Buffers are filled from the sender's rank so that results check
// themselves. What is checked beyond the values: the group is asynchronous like NCCL (an enqueue
// returns before the collective has run, and a compute stream that waits for the work's event sees
// the result), and a peer that never joins is an error after the timeout, not a hang.
//
// Only stream-local copies here: a device-wide synchronisation (cudaDeviceSynchronize, cudaFree of
// a busy device) from one rank thread would wait for the other rank's collectives, which wait for
// this thread.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <future>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "cuda_check.h"
#include "parallel/cuda/staged_group.h"
#include "parallel/launch.h"
#include "parallel/rank_threads.h"
#include "parallel/world.h"

namespace mop {
namespace {

using namespace std::chrono_literals;

#define CK(call) ASSERT_EQ((call), cudaSuccess) << #call

// A device buffer of T on the current device, with copies ordered on `s`.
template <class T> struct Buf {
  T* p = nullptr;
  size_t n;
  cudaStream_t s;
  Buf(size_t n_, cudaStream_t s_) : n(n_), s(s_) {
    if (n && cudaMalloc(&p, n * sizeof(T)) != cudaSuccess) throw std::runtime_error("cudaMalloc");
  }
  ~Buf() { cudaFree(p); }
  void put(const std::vector<T>& h) {
    if (n) cudaMemcpyAsync(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice, s);
    cudaStreamSynchronize(s);
  }
  std::vector<T> get() const {
    std::vector<T> h(n);
    if (n) cudaMemcpyAsync(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost, s);
    cudaStreamSynchronize(s);
    return h;
  }
};

// Sets MOP_STAGED_LAG_US for the groups made in its scope.
struct Lag {
  explicit Lag(const char* us) { setenv("MOP_STAGED_LAG_US", us, 1); }
  ~Lag() { unsetenv("MOP_STAGED_LAG_US"); }
};

// Runs fn(group) on 2 rank threads sharing GPU 0; the group's stream is the thread's own.
void run_two(const std::function<void(StagedGroup&)>& fn, std::chrono::milliseconds timeout = 30s) {
  const int port = free_tcp_port();
  test::run_rank_threads(2, [&](int r) {
    CK(cudaSetDevice(0));
    Groups g = make_groups(test::local_rank_info(r, 2, port), 1, timeout);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    {
      StagedGroup sg(g.twin(*g.world, "staged"), 0, s, "pair", timeout);
      fn(sg);
    }
    CK(cudaStreamDestroy(s));
  });
}

TEST(StagedGroup, EveryCollective) {
  MOP_REQUIRE_GPU();
  run_two([](StagedGroup& g) {
    const int r = g.rank(), peer = 1 - r;
    cudaStream_t s = g.stream();
    // bf16 sums in fp32, rounded once: 1.5 + 2.5 = 4 and 256 + 1 = 257 -> 256 (nearest even).
    Buf<uint16_t> x(2, s);
    x.put({f32_to_bf16(r == 0 ? 1.5f : 2.5f), f32_to_bf16(r == 0 ? 256.f : 1.f)});
    g.all_reduce_sum(x.p, 2, DType::bf16);
    const std::vector<uint16_t> xs = x.get();
    EXPECT_EQ(bf16_to_f32(xs[0]), 4.f);
    EXPECT_EQ(bf16_to_f32(xs[1]), 256.f);
    // reduce-scatter: rank r gets the sum of everyone's r-th half.
    const size_t n = 1001;
    Buf<float> in(2 * n, s), mine(n, s);
    std::vector<float> h(2 * n);
    for (size_t i = 0; i < h.size(); ++i) h[i] = float(10 * r + int(i / n));
    in.put(h);
    g.reduce_scatter_sum(in.p, mine.p, n, DType::f32);
    for (float v : mine.get()) ASSERT_EQ(v, float(2 * r + 10));
    // all-to-all-v, uneven, one direction empty: rank 0 sends 0 rows to rank 1, rank 1 sends 5.
    const std::vector<size_t> send = r == 0 ? std::vector<size_t>{3, 0} : std::vector<size_t>{5, 2};
    const std::vector<size_t> recv = r == 0 ? std::vector<size_t>{3, 5} : std::vector<size_t>{0, 2};
    Buf<int32_t> a(send[0] + send[1], s), b(recv[0] + recv[1], s);
    a.put(std::vector<int32_t>(a.n, r + 1));
    g.all_to_all_v(a.p, send, b.p, recv, DType::i32);
    const std::vector<int32_t> got = b.get();
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], i < recv[0] ? 1 : 2) << i;
    // broadcast, send / recv, barrier.
    Buf<double> d(3, s);
    d.put(std::vector<double>(3, r == 1 ? 0.25 : -1.0));
    g.broadcast(d.p, 3, 1);
    for (double v : d.get()) ASSERT_EQ(v, 0.25);
    Buf<int64_t> m(4, s);
    if (r == 0) {
      m.put(std::vector<int64_t>(4, 42));
      g.send(m.p, 4, peer, 0);
    } else {
      g.recv(m.p, 4, peer, 0);
      for (int64_t v : m.get()) ASSERT_EQ(v, 42);
    }
    g.barrier();
  });
}

// With every operation held back 300 ms on the worker, the enqueue still returns at once and the
// work is not done; a compute stream ordered by the work's event alone sees the result.
TEST(StagedGroup, AsynchronousLikeNccl) {
  MOP_REQUIRE_GPU();
  Lag lag("300000");
  run_two([](StagedGroup& g) {
    const int r = g.rank();
    const size_t n = 1 << 16;
    cudaStream_t compute;
    CK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
    {
      Buf<int32_t> in(n, g.stream()), out(2 * n, g.stream()), copy(2 * n, compute);
      in.put(std::vector<int32_t>(n, r + 7));
      const auto t0 = std::chrono::steady_clock::now();
      auto w = g.all_gather_async(in.p, n, out.p, DType::i32);
      const double enqueue_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_LT(enqueue_ms, 100.0) << "the enqueue waited for the collective";
      EXPECT_FALSE(w->done());
      CK(cudaStreamWaitEvent(compute, w->event(), 0));
      CK(cudaMemcpyAsync(copy.p, out.p, 2 * n * sizeof(int32_t), cudaMemcpyDeviceToDevice, compute));
      CK(cudaStreamSynchronize(compute));
      EXPECT_TRUE(w->done());
      w->wait();
      const std::vector<int32_t> o = copy.get();
      for (size_t i = 0; i < 2 * n; ++i) ASSERT_EQ(o[i], i < n ? 7 : 8) << i;
      // Several in flight at once complete in order, each with its own staging buffers.
      Buf<float> v0(n, g.stream()), v1(n, g.stream());
      v0.put(std::vector<float>(n, 1.f));
      v1.put(std::vector<float>(n, 2.f));
      auto w0 = g.all_reduce_sum_async(v0.p, n, DType::f32);
      auto w1 = g.all_reduce_sum_async(v1.p, n, DType::f32);
      EXPECT_FALSE(w0->done());
      w1->wait();
      EXPECT_TRUE(w0->done());
      for (float x : v0.get()) ASSERT_EQ(x, 2.f);
      for (float x : v1.get()) ASSERT_EQ(x, 4.f);
    }
    CK(cudaStreamDestroy(compute));
  });
}

// Rank 1 never joins: rank 0's work fails after the host group's timeout, naming the group, and the
// group refuses later work. Rank 1 waits for rank 0 to finish before leaving.
TEST(StagedGroup, MissingPeerTimesOutAndBreaksTheGroup) {
  MOP_REQUIRE_GPU();
  std::promise<void> rank0_done;
  std::shared_future<void> done = rank0_done.get_future().share();
  run_two(
      [&](StagedGroup& g) {
        if (g.rank() == 1) return done.wait();
        Buf<float> x(8, g.stream());
        x.put(std::vector<float>(8, 1.f));
        auto w = g.all_reduce_sum_async(x.p, 8, DType::f32);
        try {
          w->wait();
          ADD_FAILURE() << "the all-reduce without a peer returned";
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("timed out"), std::string::npos) << e.what();
        }
        EXPECT_THROW(g.all_reduce_sum_async(x.p, 8, DType::f32), Error);
        rank0_done.set_value();
      },
      2s);
}

}  // namespace
}  // namespace mop
