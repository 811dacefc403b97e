// NcclGroup: two ranks as two threads on GPUs 0 and 1. Every buffer is filled from the sender's
// rank so that results check themselves. Skips when fewer than two GPUs are visible.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "gpu_count.h"

#include <chrono>
#include <functional>
#include <stdexcept>
#include <future>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "parallel/cuda/nccl_group.h"
#include "parallel/solo_group.h"
#ifdef MOP_HAVE_GLOO
#include "parallel/gloo_group.h"
#include "parallel/tcp_store.h"
#endif
#include "parallel/rank_threads.h"

namespace mop {
namespace {

using namespace std::chrono_literals;

#define CK(call) ASSERT_EQ((call), cudaSuccess) << #call

using mop::test::gpu_count;

#define REQUIRE_GPUS(n)                                                                \
  do {                                                                                 \
    if (gpu_count() < (n))                                                             \
      GTEST_SKIP() << "needs " << (n) << " GPUs, " << gpu_count() << " visible";       \
  } while (0)

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// A device buffer of T, freed at scope exit.
template <class T> struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t n_) : n(n_) {
    if (n) cuda_ok(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc");
  }
  ~DevBuf() { cudaFree(p); }
  void put(const std::vector<T>& h) {
    if (n) cuda_ok(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), "to device");
  }
  std::vector<T> get() const {
    std::vector<T> h(n);
    if (n) cuda_ok(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "to host");
    return h;
  }
};

// Runs fn(group) on 2 threads, thread r on GPU r with its own communication stream.
void run_two(const std::function<void(NcclGroup&)>& fn,
             std::chrono::milliseconds timeout = 60s) {
  const NcclGroup::UniqueId id = NcclGroup::new_unique_id();
  test::run_rank_threads(2, [&](int r) {
    ASSERT_EQ(cudaSetDevice(r), cudaSuccess);
    cudaStream_t s;
    ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
    {
      NcclGroup g(r, 2, id, r, s, {"pair", timeout});
      fn(g);
    }
    cudaStreamDestroy(s);
  });
}

TEST(NcclGroup, AllReduceEveryType) {
  REQUIRE_GPUS(2);
  run_two([](NcclGroup& g) {
    const int r = g.rank();
    const size_t n = 100'003;
    {
      std::vector<float> h(n);
      for (size_t i = 0; i < n; ++i) h[i] = float(r * 1000 + int(i % 1000));
      DevBuf<float> d(n);
      d.put(h);
      g.all_reduce_sum(d.p, n);
      auto o = d.get();
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(o[i], float(1000 + 2 * int(i % 1000))) << i;
    }
    {
      std::vector<int64_t> h(n);
      for (size_t i = 0; i < n; ++i) h[i] = (int64_t(r) << 40) + int64_t(i);
      DevBuf<int64_t> d(n);
      d.put(h);
      g.all_reduce_sum(d.p, n);
      auto o = d.get();
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(o[i], (int64_t(1) << 40) + 2 * int64_t(i)) << i;
    }
    {
      std::vector<int32_t> h(n, r + 1);
      DevBuf<int32_t> d(n);
      d.put(h);
      g.all_reduce_sum(d.p, n);
      for (int32_t v : d.get()) ASSERT_EQ(v, 3);
    }
    {
      // bf16: small integers are exact, so the sum is too.
      std::vector<uint16_t> h(n);
      for (size_t i = 0; i < n; ++i) h[i] = f32_to_bf16(float((r + 1) * int(i % 16)));
      DevBuf<uint16_t> d(n);
      d.put(h);
      g.all_reduce_sum(d.p, n, DType::bf16);
      auto o = d.get();
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(bf16_to_f32(o[i]), float(3 * int(i % 16))) << i;
    }
    DevBuf<uint16_t> u(4);
    EXPECT_THROW(g.all_reduce_sum(u.p, 4, DType::u16), Error);  // before any NCCL call
    float* none = nullptr;
    g.all_reduce_sum(none, 0);  // n == 0 does nothing
  });
}

TEST(NcclGroup, AllGatherReduceScatterBroadcast) {
  REQUIRE_GPUS(2);
  run_two([](NcclGroup& g) {
    const int r = g.rank();
    const size_t n = 513;
    std::vector<int64_t> h(n);
    for (size_t i = 0; i < n; ++i) h[i] = r * 100'000 + int64_t(i);
    DevBuf<int64_t> in(n), out(2 * n);
    in.put(h);
    g.all_gather(in.p, n, out.p);
    auto o = out.get();
    for (int s = 0; s < 2; ++s)
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(o[s * n + i], s * 100'000 + int64_t(i));

    std::vector<float> rs(2 * n);
    for (int p = 0; p < 2; ++p)
      for (size_t i = 0; i < n; ++i) rs[p * n + i] = float(r * 1000 + p * 100 + int(i % 50));
    DevBuf<float> rin(2 * n), rout(n);
    rin.put(rs);
    g.reduce_scatter_sum(rin.p, rout.p, n);
    auto ro = rout.get();
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(ro[i], float(1000 + 2 * (r * 100 + int(i % 50))));

    std::vector<int32_t> b(77, r == 1 ? 4242 : -1);
    DevBuf<int32_t> db(77);
    db.put(b);
    g.broadcast(db.p, 77, 1);
    for (int32_t v : db.get()) ASSERT_EQ(v, 4242);
    g.barrier();
  });
}

// GPU ZeRO's pattern: a unit's rank-r chunk sits at r * chunk of its padded whole, so the
// reduce-scatter and the all-gather run in place (bf16, as the gradients and weights are).
TEST(NcclGroup, InPlaceChunksOfOneBuffer) {
  REQUIRE_GPUS(2);
  run_two([](NcclGroup& g) {
    const int r = g.rank();
    const size_t chunk = 1031;
    std::vector<uint16_t> h(2 * chunk);
    for (size_t i = 0; i < h.size(); ++i) h[i] = f32_to_bf16(float(int(i % 97) + r));
    DevBuf<uint16_t> buf(2 * chunk);
    buf.put(h);
    g.reduce_scatter_sum(buf.p, buf.p + r * chunk, chunk, DType::bf16);
    auto o = buf.get();
    for (size_t i = 0; i < chunk; ++i)
      ASSERT_EQ(bf16_to_f32(o[r * chunk + i]), float(2 * int((r * chunk + i) % 97) + 1)) << "element " << i;
    for (size_t i = 0; i < chunk; ++i) h[r * chunk + i] = f32_to_bf16(float(r * 100 + int(i % 89)));
    buf.put(h);
    g.all_gather(buf.p + r * chunk, chunk, buf.p, DType::bf16);
    o = buf.get();
    for (int s = 0; s < 2; ++s)
      for (size_t i = 0; i < chunk; ++i)
        ASSERT_EQ(bf16_to_f32(o[s * chunk + i]), float(s * 100 + int(i % 89))) << "rank " << s << " element " << i;
  });
}

// Element j of the row rank s sends to rank p.
int64_t a2a_value(int s, int p, size_t j) { return s * 1'000'000 + p * 100'000 + int64_t(j); }

void check_all_to_all(NcclGroup& g, const std::function<size_t(int from, int to)>& count) {
  const int r = g.rank();
  std::vector<size_t> sc(2), rc(2);
  std::vector<int64_t> h;
  size_t nr = 0;
  for (int p = 0; p < 2; ++p) {
    sc[p] = count(r, p);
    rc[p] = count(p, r);
    nr += rc[p];
    for (size_t j = 0; j < sc[p]; ++j) h.push_back(a2a_value(r, p, j));
  }
  DevBuf<int64_t> in(h.size()), out(nr);
  in.put(h);
  g.all_to_all_v(in.p, sc, out.p, rc);
  auto o = out.get();
  size_t k = 0;
  for (int s = 0; s < 2; ++s)
    for (size_t j = 0; j < rc[s]; ++j, ++k)
      ASSERT_EQ(o[k], a2a_value(s, r, j)) << "rank " << r << " from " << s << " elem " << j;
}

TEST(NcclGroup, AllToAllVUnevenAndEmpty) {
  REQUIRE_GPUS(2);
  run_two([](NcclGroup& g) {
    check_all_to_all(g, [](int s, int p) { return size_t(3 * s + 5 * p + 1); });
    check_all_to_all(g, [](int s, int p) { return p == 0 ? size_t(4000 + s) : 0; });  // all to 0
    check_all_to_all(g, [](int s, int p) { return s == p ? 0 : size_t(17); });       // none to self
    check_all_to_all(g, [](int, int) { return size_t(0); });                         // nothing
    // bf16 rows through the DType entry point.
    const int r = g.rank();
    std::vector<uint16_t> h{f32_to_bf16(float(r)), f32_to_bf16(float(r + 10))};
    DevBuf<uint16_t> in(2), out(2);
    in.put(h);
    g.all_to_all_v(in.p, {1, 1}, out.p, {1, 1}, DType::bf16);
    auto o = out.get();
    EXPECT_EQ(bf16_to_f32(o[0]), r == 0 ? 0.f : 10.f);  // row from rank 0 for me
    EXPECT_EQ(bf16_to_f32(o[1]), r == 0 ? 1.f : 11.f);  // row from rank 1 for me
    EXPECT_THROW(g.all_to_all_v(in.p, {1}, out.p, {1, 1}, DType::bf16), Error);
  });
}

TEST(NcclGroup, SendRecv) {
  REQUIRE_GPUS(2);
  run_two([](NcclGroup& g) {
    const int r = g.rank(), peer = 1 - r;
    const size_t n = 1 << 20;
    std::vector<float> h(n);
    for (size_t i = 0; i < n; ++i) h[i] = float(r * 10 + int(i % 7));
    DevBuf<float> mine(n), theirs(n);
    mine.put(h);
    if (r == 0) {
      g.send(mine.p, n, peer, 0);
      g.recv(theirs.p, n, peer, 0);
    } else {
      g.recv(theirs.p, n, peer, 0);
      g.send(mine.p, n, peer, 0);
    }
    auto o = theirs.get();
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(o[i], float(peer * 10 + int(i % 7))) << i;
  });
}

// An async all-gather ordered before work on another stream by its event, with no host wait.
TEST(NcclGroup, AsyncEventOrdersAComputeStream) {
  REQUIRE_GPUS(2);
  run_two([](NcclGroup& g) {
    const int r = g.rank();
    const size_t n = 1 << 22;  // big enough to still be running when the copy is queued
    std::vector<int32_t> h(n, r + 7);
    DevBuf<int32_t> in(n), out(2 * n), copy(2 * n);
    in.put(h);
    cudaStream_t compute;
    CK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
    auto w = g.all_gather_async(in.p, n, out.p, DType::i32);
    CK(cudaStreamWaitEvent(compute, w->event(), 0));
    CK(cudaMemcpyAsync(copy.p, out.p, 2 * n * sizeof(int32_t), cudaMemcpyDeviceToDevice, compute));
    CK(cudaStreamSynchronize(compute));
    EXPECT_TRUE(w->done());
    w->wait();
    auto o = copy.get();
    for (size_t i = 0; i < 2 * n; ++i) ASSERT_EQ(o[i], i < n ? 7 : 8) << i;
    // Through the base-class interface too.
    ProcessGroup& pg = g;
    auto w2 = pg.all_reduce_sum_async(in.p, n);
    w2->wait();
    for (int32_t v : in.get()) ASSERT_EQ(v, 15);
    cudaStreamDestroy(compute);
  });
}

// Rank 1 never joins the all-reduce: rank 0 times out, the communicator is aborted and the
// group refuses further work.
TEST(NcclGroup, TimeoutAbortsAndBreaksTheGroup) {
  REQUIRE_GPUS(2);
  std::promise<void> rank0_done;
  std::shared_future<void> done = rank0_done.get_future().share();
  run_two(
      [&](NcclGroup& g) {
        if (g.rank() == 1) {
          done.wait();
          return;
        }
        DevBuf<float> d(16);
        std::string msg;
        auto t0 = std::chrono::steady_clock::now();
        try {
          g.all_reduce_sum(d.p, 16);
        } catch (const Error& e) {
          msg = e.what();
        }
        double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        rank0_done.set_value();
        EXPECT_NE(msg.find("'pair'"), std::string::npos) << msg;
        EXPECT_NE(msg.find("all_reduce_sum"), std::string::npos) << msg;
        EXPECT_NE(msg.find("timed out after 2000 ms"), std::string::npos) << msg;
        EXPECT_GE(secs, 1.5);
        EXPECT_LT(secs, 20.0);
        EXPECT_THROW(g.barrier(), Error);
      },
      2000ms);
}

#ifdef MOP_HAVE_GLOO
// make_nccl_group: the unique id travels over a Gloo group.
TEST(NcclGroup, MakeFromAGlooGroup) {
  REQUIRE_GPUS(2);
  auto server = std::make_shared<TcpStore>("127.0.0.1", 0, true, 30s);
  test::run_rank_threads(2, [&](int r) {
    ASSERT_EQ(cudaSetDevice(r), cudaSuccess);
    GlooOptions o;
    o.store = r == 0 ? server : make_tcp_store("127.0.0.1", server->port(), false, 30s);
    o.prefix = "host";
    o.timeout = 30s;
    GlooGroup host(r, 2, o);
    cudaStream_t s;
    ASSERT_EQ(cudaStreamCreate(&s), cudaSuccess);
    {
      auto g = make_nccl_group(host, r, s, {"made", 30s});
      EXPECT_EQ(g->rank(), r);
      EXPECT_EQ(g->size(), 2);
      DevBuf<int64_t> d(1);
      d.put({int64_t(r + 1)});
      g->all_reduce_sum(d.p, 1);
      EXPECT_EQ(d.get()[0], 3);
    }
    cudaStreamDestroy(s);
  });
}
#endif

}  // namespace
}  // namespace mop
