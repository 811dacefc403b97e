// embedding_forward / embedding_backward against mop::cpu::embedding_* on bf16-representable data.
// Tolerance: none. Forward is a copy. Backward adds the same fp32 values in the same order as the
// CPU op (the existing dwte row, then dout rows by ascending position), so it must match bit for
// bit; any difference means the summation order is wrong.
#include "ops/cpu/embedding.h"
#include "ops/cuda/embedding.h"

#include <cstdio>

#include "cuda_test_util.h"

using namespace mop;
using namespace mop::test;

namespace {

const int kNs[] = {1, 7, 37, 300};
const int kDs[] = {5, 64, 127, 1024, 2048};

std::vector<int32_t> random_tokens(int N, int V, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<int32_t> t(N);
  for (auto& x : t) x = int32_t(g() % uint64_t(V));
  return t;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

// Runs the CUDA backward on dwte0 (V rows plus one guard row that must stay untouched) and
// returns the V x D result.
std::vector<float> gpu_backward(const std::vector<float>& dwte0, const std::vector<float>& dout,
                                const std::vector<int32_t>& tokens, int N, int D, int V) {
  std::vector<float> guarded = dwte0;
  const std::vector<float> guard = random_bf16_values(D, 99);
  guarded.insert(guarded.end(), guard.begin(), guard.end());
  DeviceArray<float> d_dwte(guarded);
  DeviceArray<bf16> d_dout(to_bf16(dout));
  DeviceArray<int32_t> d_tok(tokens);
  DeviceArray<uint8_t> ws(cuda::embedding_backward_workspace(N));
  cuda::embedding_backward(d_dwte.data(), d_dout.data(), d_tok.data(), N, D, V, ws.data(), ws.size(), nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> got = d_dwte.download();
  EXPECT_TRUE(std::equal(guard.begin(), guard.end(), got.begin() + size_t(V) * D)) << "guard row written";
  got.resize(size_t(V) * D);
  return got;
}

// CPU reference on the in-range tokens only (the CUDA op skips the others).
void check_backward(const std::vector<int32_t>& tokens, int D, int V, const char* what) {
  const int N = int(tokens.size());
  SCOPED_TRACE(::testing::Message() << what << " N=" << N << " D=" << D << " V=" << V);
  const std::vector<float> dout = random_bf16_values(size_t(N) * D, 31 * N + D);
  const std::vector<float> dwte0 = random_bf16_values(size_t(V) * D, 7 * N + D, 4.f);  // accumulate onto this
  std::vector<float> ref = dwte0, dout_ok;
  std::vector<int32_t> tok_ok;
  for (int n = 0; n < N; ++n)
    if (tokens[n] >= 0 && tokens[n] < V) {
      tok_ok.push_back(tokens[n]);
      dout_ok.insert(dout_ok.end(), dout.begin() + size_t(n) * D, dout.begin() + size_t(n + 1) * D);
    }
  cpu::embedding_backward<float>(ref.data(), dout_ok.data(), tok_ok.data(), int(tok_ok.size()), D, V);
  const std::vector<float> got = gpu_backward(dwte0, dout, tokens, N, D, V);
  expect_close(got, ref, 0, 0, "dwte");
  EXPECT_TRUE(same_bits(got, gpu_backward(dwte0, dout, tokens, N, D, V))) << "not deterministic";
}

}  // namespace

TEST(CudaEmbedding, ForwardCopiesRows) {
  MOP_REQUIRE_GPU();
  const int V = 50;
  for (int N : kNs)
    for (int D : kDs) {
      SCOPED_TRACE(::testing::Message() << "N=" << N << " D=" << D);
      const std::vector<float> wte = random_bf16_values(size_t(V) * D, N + D);
      const std::vector<int32_t> tokens = random_tokens(N, V, N * 13 + D);
      std::vector<float> ref(size_t(N) * D);
      cpu::embedding_forward<float>(ref.data(), tokens.data(), wte.data(), N, D, V);
      DeviceArray<bf16> d_wte(to_bf16(wte)), d_out(ref.size());
      DeviceArray<int32_t> d_tok(tokens);
      cuda::embedding_forward(d_out.data(), d_tok.data(), d_wte.data(), N, D, V, nullptr);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      expect_close(to_f32(d_out.download()), ref, 0, 0, "out");
    }
}

TEST(CudaEmbedding, ForwardWritesZerosForOutOfRangeIds) {
  MOP_REQUIRE_GPU();
  const int N = 4, D = 64, V = 10;
  const std::vector<float> wte = random_bf16_values(size_t(V) * D, 3);
  const std::vector<int32_t> tokens = {2, -1, V, 9};
  DeviceArray<bf16> d_wte(to_bf16(wte)), d_out(to_bf16(std::vector<float>(size_t(N) * D, 5.f)));
  DeviceArray<int32_t> d_tok(tokens);
  cuda::embedding_forward(d_out.data(), d_tok.data(), d_wte.data(), N, D, V, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> out = to_f32(d_out.download());
  for (int d = 0; d < D; ++d) {
    EXPECT_EQ(out[d], wte[2 * D + d]);
    EXPECT_EQ(out[D + d], 0.f);
    EXPECT_EQ(out[2 * D + d], 0.f);
    EXPECT_EQ(out[3 * D + d], wte[9 * D + d]);
  }
}

TEST(CudaEmbedding, BackwardMatchesCpuBitwise) {
  MOP_REQUIRE_GPU();
  for (int N : kNs)
    for (int D : kDs) check_backward(random_tokens(N, 50, N + 5 * D), D, 50, "random, V=50");
}

TEST(CudaEmbedding, BackwardRepeatedTokens) {
  MOP_REQUIRE_GPU();
  for (int N : {7, 300, 4099})  // 4099: one long run, more than the kernel's unroll many times over
    for (int D : {5, 64, 127, 2048}) {
      check_backward(std::vector<int32_t>(N, 3), D, 10, "all equal");
      std::vector<int32_t> half = random_tokens(N, 1000, N + D);
      for (int n = 0; n < N; n += 2) half[n] = 7;  // every other token is 7, interleaved
      check_backward(half, D, 1000, "half equal");
    }
  check_backward(std::vector<int32_t>(33, 0), 17, 1, "V=1");
}

TEST(CudaEmbedding, BackwardSkipsOutOfRangeIds) {
  MOP_REQUIRE_GPU();
  // Bad ids next to valid ones with the same low bits; id V would land on the guard row.
  std::vector<int32_t> tokens = {3, -1, 3, 16 + 3, 19, 16, -16, 3, 0, 16};
  check_backward(tokens, 64, 16, "bad ids");
  check_backward(tokens, 5, 16, "bad ids");
}

// Informative only: prints the achieved bandwidth, never fails on speed.
TEST(CudaEmbedding, Bandwidth) {
  MOP_REQUIRE_GPU();
  const int N = 16384, D = 2048, V = 50304;
  DeviceArray<bf16> wte(size_t(V) * D), out(size_t(N) * D);
  DeviceArray<float> dwte(size_t(V) * D);
  DeviceArray<int32_t> tok(random_tokens(N, V, 1));
  DeviceArray<uint8_t> ws(cuda::embedding_backward_workspace(N));
  const double fwd = median_ms([&] { cuda::embedding_forward(out.data(), tok.data(), wte.data(), N, D, V, nullptr); });
  const double bwd = median_ms([&] {
    cuda::embedding_backward(dwte.data(), out.data(), tok.data(), N, D, V, ws.data(), ws.size(), nullptr);
  });
  // Bytes: forward reads and writes N bf16 rows; backward reads N bf16 rows and read-modify-writes
  // (at most) N fp32 rows of dwte; the sort is not counted.
  const double rows = double(N) * D;
  std::printf("[embedding N=%d D=%d V=%d] forward %.3f ms %.0f GB/s, backward %.3f ms %.0f GB/s\n", N, D, V, fwd,
              4.0 * rows / (fwd * 1e6), bwd, 10.0 * rows / (bwd * 1e6));
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}
