// CUTLASS 3 Hopper grouped GEMMs for the expert layers (backend "cutlass"): one persistent
// warp-specialized kernel per product walks the tiles of every expert, so small per-expert GEMMs fill
// all SMs together (cuBLAS's grouped call and per-expert calls leave most SMs idle at MoE shapes).
// One instantiation per product, because each costs about a minute of nvcc:
//   y  (rows x O) = x (rows x I, K-major) * w_e^T (w_e is O x I: K-major)      bf16 out
//   dx (rows x I) = dy (rows x O, K-major) * w_e (O x I: N-major)              bf16 out
//   dw (O x I)   += dy^T (M-major) * x (N-major), K = the expert's rows         fp32 out, beta = 1
// and the bf16-gradient dw in grouped_matmul_cutlass_wgrad16.cu (compiled in parallel with this one).
// Each tile is computed by one CTA from start to end (no split-K, no stream-K): deterministic.
// Per-group pointers, strides and problem shapes are written on the device from the device offsets
// (only non-empty experts become groups, in expert order, matching the host list).
#include "ops/cuda/grouped_matmul_cutlass.cuh"

namespace mop::cuda::detail {

bool cutlass_grouped_supported(int I, int O) {
  // TMA needs 16-byte aligned rows and bases: leading dimensions a multiple of 8 bf16 elements.
  return I % 8 == 0 && O % 8 == 0;
}

void cutlass_grouped_forward(__nv_bfloat16* y, const __nv_bfloat16* x, const __nv_bfloat16* w,
                             const int32_t* offsets_device, const int32_t* offsets_host, const std::vector<int>& experts,
                             int E, int I, int O, cudaStream_t stream) {
  using C = Fwd;
  SetupArgs<C> s{};
  s.a = {reinterpret_cast<const char*>(x), 0, I * kB};
  s.b = {reinterpret_cast<const char*>(w), int64_t(O) * I * kB, 0};
  s.c = {nullptr, 0, 0};
  s.d = {reinterpret_cast<const char*>(y), 0, O * kB};
  s.sa = leading_stride<C::StrideA>(I);  // x: rows x I, row-major
  s.sb = leading_stride<C::StrideB>(I);  // w_e: O x I = N x K, K contiguous
  s.sc = leading_stride<C::StrideC>(O);
  s.sd = leading_stride<C::StrideD>(O);
  s.fixed = Mnk{0, O, I};
  s.vary_mode = 0;
  run<C>("forward", shapes_of(experts, offsets_host, s.fixed, 0), offsets_device, E, s, 0.f, stream);
}

void cutlass_grouped_dgrad(__nv_bfloat16* dx, const __nv_bfloat16* dy, const __nv_bfloat16* w,
                           const int32_t* offsets_device, const int32_t* offsets_host, const std::vector<int>& experts,
                           int E, int I, int O, cudaStream_t stream) {
  using C = Dgrad;
  SetupArgs<C> s{};
  s.a = {reinterpret_cast<const char*>(dy), 0, O * kB};
  s.b = {reinterpret_cast<const char*>(w), int64_t(O) * I * kB, 0};
  s.c = {nullptr, 0, 0};
  s.d = {reinterpret_cast<const char*>(dx), 0, I * kB};
  s.sa = leading_stride<C::StrideA>(O);  // dy: rows x O, row-major
  s.sb = leading_stride<C::StrideB>(I);  // w_e: O x I = K x N, N contiguous
  s.sc = leading_stride<C::StrideC>(I);
  s.sd = leading_stride<C::StrideD>(I);
  s.fixed = Mnk{0, I, O};
  s.vary_mode = 0;
  run<C>("dgrad", shapes_of(experts, offsets_host, s.fixed, 0), offsets_device, E, s, 0.f, stream);
}

void cutlass_grouped_wgrad(float* dw, const __nv_bfloat16* dy, const __nv_bfloat16* x, const int32_t* offsets_device,
                           const int32_t* offsets_host, const std::vector<int>& experts, int E, int I, int O,
                           cudaStream_t stream) {
  grouped_wgrad<Wgrad>(dw, dy, x, offsets_device, offsets_host, experts, E, I, O, stream);
}

}  // namespace mop::cuda::detail
