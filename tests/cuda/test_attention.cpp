// cuDNN fused attention vs the CPU reference (float, on the same bf16-rounded inputs).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "core/error.h"
#include "cuda_test_util.h"
#include "ops/cpu/attention.h"
#include "ops/cuda/attention.h"

using namespace mop;
using namespace mop::test;

namespace {

struct Case {
  std::vector<int> lengths;  // document lengths, packed in this order
  int H = 4, KVH = 2, hd = 64;
  bool fused = false;         // q/k/v are strided views into one (N, (H + 2 KVH) hd) QKV buffer
  bool force_ragged = false;  // THD layout even when the documents have equal lengths
  bool deterministic = false;
};

// Sets the process-wide attention options for one test and restores them afterwards.
struct OptionsScope {
  cuda::AttentionOptions saved = cuda::attention_options();
  explicit OptionsScope(cuda::AttentionOptions o) { cuda::set_attention_options(o); }
  ~OptionsScope() { cuda::set_attention_options(saved); }
};

template <class T> void fill_nan(DeviceArray<T>& a) {  // 0xFFFF.. is NaN in bf16 and fp32: catches unwritten rows
  ASSERT_EQ(cudaMemset(a.data(), 0xFF, a.size() * sizeof(T)), cudaSuccess);
}

double max_abs(const std::vector<float>& x) {
  double m = 0;
  for (float v : x) m = std::max(m, double(std::abs(v)));
  return m;
}

void run_case(const Case& c, uint64_t seed) {
  OptionsScope opts({c.deterministic, c.force_ragged});
  const int n_docs = int(c.lengths.size()), H = c.H, KVH = c.KVH, hd = c.hd;
  std::vector<int32_t> cu(n_docs + 1, 0);
  for (int b = 0; b < n_docs; ++b) cu[b + 1] = cu[b] + c.lengths[b];
  const int N = cu[n_docs], max_len = *std::max_element(c.lengths.begin(), c.lengths.end());
  const float scale = 1.f / std::sqrt(float(hd));
  const size_t nq = size_t(N) * H * hd, nkv = size_t(N) * KVH * hd;
  // q and k a bit larger than 1 so the softmax is not nearly uniform.
  const std::vector<float> q = random_bf16_values(nq, seed, 2.f), k = random_bf16_values(nkv, seed + 1, 2.f),
                           v = random_bf16_values(nkv, seed + 2), dout = random_bf16_values(nq, seed + 3);

  // Device q/k/v: separate contiguous arrays, or column blocks of one fused row-major buffer.
  const int width = (H + 2 * KVH) * hd;
  const int qrs = c.fused ? width : H * hd, kvrs = c.fused ? width : KVH * hd;
  std::vector<float> fused_host;
  if (c.fused) {
    fused_host.assign(size_t(N) * width, 0.f);
    for (int n = 0; n < N; ++n) {
      float* row = fused_host.data() + size_t(n) * width;
      std::copy_n(q.data() + size_t(n) * H * hd, H * hd, row);
      std::copy_n(k.data() + size_t(n) * KVH * hd, KVH * hd, row + H * hd);
      std::copy_n(v.data() + size_t(n) * KVH * hd, KVH * hd, row + (H + KVH) * hd);
    }
  }
  DeviceArray<bf16> fused_d(to_bf16(fused_host)), q_d(to_bf16(c.fused ? std::vector<float>{} : q)),
      k_d(to_bf16(c.fused ? std::vector<float>{} : k)), v_d(to_bf16(c.fused ? std::vector<float>{} : v));
  const bf16* qp = c.fused ? fused_d.data() : q_d.data();
  const bf16* kp = c.fused ? fused_d.data() + H * hd : k_d.data();
  const bf16* vp = c.fused ? fused_d.data() + (H + KVH) * hd : v_d.data();
  DeviceArray<int32_t> cu_d(cu);

  const size_t ws_bytes = cuda::attention_workspace_bytes(n_docs, max_len, N, H, KVH, hd, qrs, kvrs);
  DeviceArray<uint8_t> ws(ws_bytes);

  // ---- forward
  DeviceArray<bf16> out_d(nq);
  DeviceArray<float> lse_d(size_t(N) * H);
  fill_nan(out_d);
  fill_nan(lse_d);
  cuda::attention_forward(out_d.data(), lse_d.data(), qp, kp, vp, cu_d.data(), cu.data(), n_docs, max_len, N, H, KVH,
                          hd, scale, qrs, kvrs, ws.data(), ws_bytes, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> out_ref(nq), lse_ref(size_t(N) * H);
  cpu::attention_forward<float>(out_ref.data(), lse_ref.data(), q.data(), k.data(), v.data(), cu.data(), n_docs, N,
                                H, KVH, hd, scale);
  const std::vector<float> out = to_f32(out_d.download()), lse = lse_d.download();
  expect_close(out, out_ref, 4 * kBf16Eps, 1e-2, "out");
  expect_close(lse, lse_ref, 1e-5, 1e-3, "lse");

  // ---- backward: the reference takes the op's own out and lse, so it checks the backward alone
  DeviceArray<bf16> dout_d(to_bf16(dout)), dq_d(nq), dk_d(nkv), dv_d(nkv);
  fill_nan(dq_d);
  fill_nan(dk_d);
  fill_nan(dv_d);
  cuda::attention_backward(dq_d.data(), dk_d.data(), dv_d.data(), dout_d.data(), out_d.data(), lse_d.data(), qp, kp,
                           vp, cu_d.data(), cu.data(), n_docs, max_len, N, H, KVH, hd, scale, qrs, kvrs, ws.data(),
                           ws_bytes, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> dq_ref(nq), dk_ref(nkv), dv_ref(nkv);
  cpu::attention_backward<float>(dq_ref.data(), dk_ref.data(), dv_ref.data(), dout.data(), out.data(), lse.data(),
                                 q.data(), k.data(), v.data(), cu.data(), n_docs, N, H, KVH, hd, scale);
  const std::vector<bf16> dq_bits = dq_d.download();
  expect_close(to_f32(dq_bits), dq_ref, 8 * kBf16Eps, 2e-2 * max_abs(dq_ref), "dq");
  expect_close(to_f32(dk_d.download()), dk_ref, 8 * kBf16Eps, 2e-2 * max_abs(dk_ref), "dk");
  expect_close(to_f32(dv_d.download()), dv_ref, 8 * kBf16Eps, 2e-2 * max_abs(dv_ref), "dv");

  if (c.deterministic) {  // a second run gives the same bits
    fill_nan(dq_d);
    cuda::attention_backward(dq_d.data(), dk_d.data(), dv_d.data(), dout_d.data(), out_d.data(), lse_d.data(), qp,
                             kp, vp, cu_d.data(), cu.data(), n_docs, max_len, N, H, KVH, hd, scale, qrs, kvrs,
                             ws.data(), ws_bytes, nullptr);
    const std::vector<bf16> again = dq_d.download();
    EXPECT_EQ(std::memcmp(again.data(), dq_bits.data(), again.size() * sizeof(bf16)), 0) << "dq not bit-identical";
  }
}

}  // namespace

TEST(CudaAttention, OneDocumentGqa) {  // batched layout, 2 query heads per kv head
  MOP_REQUIRE_GPU();
  run_case({.lengths = {128}, .H = 4, .KVH = 2, .hd = 64}, 1);
}

TEST(CudaAttention, OneDocumentHd128Mqa) {  // one kv head, a length that is no multiple of 64
  MOP_REQUIRE_GPU();
  run_case({.lengths = {200}, .H = 4, .KVH = 1, .hd = 128}, 2);
}

TEST(CudaAttention, PackedOddDocuments) {  // THD layout: lengths 1, 37, 100, 250
  MOP_REQUIRE_GPU();
  run_case({.lengths = {1, 37, 100, 250}, .H = 4, .KVH = 2, .hd = 64}, 3);
}

TEST(CudaAttention, PackedOddDocumentsHd128) {
  MOP_REQUIRE_GPU();
  run_case({.lengths = {250, 1, 100, 37}, .H = 4, .KVH = 1, .hd = 128}, 4);
}

TEST(CudaAttention, PackedFromFusedQkvBuffer) {  // strided q/k/v views, THD layout
  MOP_REQUIRE_GPU();
  run_case({.lengths = {1, 37, 100, 250}, .H = 4, .KVH = 2, .hd = 64, .fused = true}, 5);
}

TEST(CudaAttention, ManyDocumentsPaddedBatch) {  // 37 documents: the batch is padded to 64 with empty ones
  MOP_REQUIRE_GPU();
  std::vector<int> lengths;
  for (int b = 0; b < 37; ++b) lengths.push_back(1 + (b * 29) % 90);
  run_case({.lengths = lengths, .H = 2, .KVH = 2, .hd = 64}, 6);
}

TEST(CudaAttention, EqualLengthBatch) {  // 3 sequences of 96 tokens: batched BSHD layout
  MOP_REQUIRE_GPU();
  run_case({.lengths = {96, 96, 96}, .H = 4, .KVH = 4, .hd = 64}, 7);
}

TEST(CudaAttention, EqualLengthBatchFromFusedQkvBuffer) {
  MOP_REQUIRE_GPU();
  run_case({.lengths = {96, 96, 96}, .H = 4, .KVH = 2, .hd = 128, .fused = true}, 8);
}

TEST(CudaAttention, EqualLengthBatchForcedRagged) {  // same shape through the THD layout
  MOP_REQUIRE_GPU();
  run_case({.lengths = {96, 96, 96}, .H = 4, .KVH = 2, .hd = 64, .force_ragged = true}, 9);
}

TEST(CudaAttention, DeterministicBackward) {
  MOP_REQUIRE_GPU();
  run_case({.lengths = {128, 128}, .H = 4, .KVH = 2, .hd = 64, .deterministic = true}, 10);
  run_case({.lengths = {1, 37, 100, 250}, .H = 4, .KVH = 2, .hd = 64, .deterministic = true}, 11);
}

TEST(CudaAttention, RejectsBadShapes) {  // validation precedes any device work
  const int32_t cu[3] = {0, 10, 20};
  auto fwd = [&](int n_docs, int max_len, int N, int H, int KVH, int hd) {
    cuda::attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, cu, n_docs, max_len, N, H, KVH, hd,
                            1.f, H * hd, KVH * hd, nullptr, 0, nullptr);
  };
  EXPECT_THROW(fwd(2, 10, 20, 4, 3, 64), Error);  // H % KVH
  EXPECT_THROW(fwd(2, 10, 20, 4, 2, 60), Error);  // hd not a multiple of 8
  EXPECT_THROW(fwd(2, 10, 21, 4, 2, 64), Error);  // cu_seqlens[n_docs] != N
  EXPECT_THROW(fwd(2, 9, 20, 4, 2, 64), Error);   // a document longer than max_doc_len
}

// Prints forward and backward throughput for one causal 16K-token document; never fails on speed.
TEST(CudaAttention, Benchmark16K) {
  MOP_REQUIRE_GPU();
  const int S = 16384, H = 16, hd = 128;
  const int32_t cu[2] = {0, S};
  DeviceArray<int32_t> cu_d(std::vector<int32_t>(cu, cu + 2));
  const size_t nq = size_t(S) * H * hd;
  const std::vector<bf16> host = to_bf16(random_bf16_values(nq, 42));
  DeviceArray<bf16> q(host), k(host), v(host), dout(host), out(nq), dq(nq), dk(nq), dv(nq);
  DeviceArray<float> lse(size_t(S) * H);
  const double fwd_flop = 2.0 * 2.0 * double(S) * S / 2 * H * hd, bwd_flop = 2.5 * fwd_flop;
  struct Config { int KVH; bool ragged, det; const char* name; };
  for (const Config& cfg : {Config{16, false, false, "BSHD"}, Config{4, false, false, "BSHD"},
                            Config{16, true, false, "THD"}, Config{4, true, false, "THD"},
                            Config{16, false, true, "BSHD deterministic"}}) {
    OptionsScope opts({cfg.det, cfg.ragged});
    const int KVH = cfg.KVH, qrs = H * hd, kvrs = KVH * hd;
    const float scale = 1.f / std::sqrt(float(hd));
    const auto b0 = std::chrono::steady_clock::now();
    const size_t ws_bytes = cuda::attention_workspace_bytes(1, S, S, H, KVH, hd, qrs, kvrs);
    const double build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - b0).count();
    DeviceArray<uint8_t> ws(ws_bytes);
    auto fwd = [&] {
      cuda::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), cu_d.data(), cu, 1, S, S, H, KVH,
                              hd, scale, qrs, kvrs, ws.data(), ws_bytes, nullptr);
    };
    auto bwd = [&] {
      cuda::attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), out.data(), lse.data(), q.data(),
                               k.data(), v.data(), cu_d.data(), cu, 1, S, S, H, KVH, hd, scale, qrs, kvrs, ws.data(),
                               ws_bytes, nullptr);
    };
    const double f_ms = median_ms(fwd), b_ms = median_ms(bwd);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::printf("attention causal S=%d H=%d KVH=%d hd=%d %s: fwd %.3f ms %.0f TFLOP/s (target 635), "
                "bwd %.3f ms %.0f TFLOP/s (target 576); graph build %.2f s, workspace %.1f MiB\n",
                S, H, KVH, hd, cfg.name, f_ms, fwd_flop / f_ms * 1e-9, b_ms, bwd_flop / b_ms * 1e-9, build_s,
                double(ws_bytes) / (1 << 20));
  }
}
