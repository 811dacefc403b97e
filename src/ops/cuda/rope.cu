#include "ops/cuda/rope.h"

#include <algorithm>
#include <initializer_list>

#include "ops/cuda/check.cuh"
#include "ops/cuda/rmsnorm.h"  // add_partial_rows

namespace mop::cuda {

namespace {

// One warp per token, so each token's cos/sin are computed once, in double, and shared by all
// its heads through shared memory. The warp's lanes form 32 / kGroup slots of kGroup lanes; slot
// s takes heads s, s + slots, ...; within a head, lane g of its slot owns the pairs (i, i + hd/2)
// for i = g kVec + j kGroup kVec + k (k < kVec). Generic path: kGroup = 32 (a head at a time),
// kVec = 2 (4-byte accesses) or 1. Fast path for hd = 64, 128, 256: kVec = 8 (16-byte accesses)
// and kGroup = hd / 16, one access per half-row per lane and several heads in flight per warp.
// Every pass uses the same mapping, so a lane only rereads what it read itself: in place is safe.
constexpr int kWarps = 4;
constexpr int kMaxFwdBlocks = 8192;
constexpr int kMaxBwdBlocks = 2048;  // ~8192 warps: fills an H200; fixes the scratch size

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// kVec bf16 moved as one access (alignas makes 8 of them one 16-byte load), math in fp32.
template <int kVec> struct alignas(2 * kVec) Chunk {
  __nv_bfloat16 h[kVec];
};
template <int kVec> struct Pack {
  float v[kVec];
};
template <int kVec> __device__ inline Pack<kVec> load(const __nv_bfloat16* p) {
  const Chunk<kVec> c = *reinterpret_cast<const Chunk<kVec>*>(p);
  Pack<kVec> out;
#pragma unroll
  for (int k = 0; k < kVec; ++k) out.v[k] = __bfloat162float(c.h[k]);
  return out;
}
// Stores go through whole 32-bit words; __stwb (the default write-back policy) keeps the 16-byte
// store one instruction, which a plain uint4 assignment here did not.
template <int kVec> __device__ inline void store(__nv_bfloat16* p, const Pack<kVec>& x) {
  if constexpr (kVec == 1) {
    p[0] = __float2bfloat16_rn(x.v[0]);
  } else {
    uint32_t u[kVec / 2];
#pragma unroll
    for (int k = 0; k < kVec / 2; ++k) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(x.v[2 * k], x.v[2 * k + 1]);
      u[k] = *reinterpret_cast<const uint32_t*>(&h);
    }
    if constexpr (kVec == 2) {
      *reinterpret_cast<uint32_t*>(p) = u[0];
    } else {
      __stwb(reinterpret_cast<uint4*>(p), make_uint4(u[0], u[1], u[2], u[3]));
    }
  }
}

// Sum over the kGroup lanes of a slot (xor offsets below kGroup stay inside the aligned group);
// every lane of the group gets the sum, in the same order on every run.
template <int kGroup> __device__ inline float group_sum(float x) {
#pragma unroll
  for (int o = kGroup / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Shared memory: inv_freq[hd/2] (double, once per block), per warp [cos | sin] of hd floats and,
// in backward with norm, per warp and slot a dw accumulator of hd floats.
inline size_t smem_bytes(int hd, bool dw, int slots) {
  return size_t(hd / 2) * sizeof(double) + size_t(kWarps) * hd * sizeof(float) * (1 + (dw ? slots : 0));
}

__device__ inline void fill_inv_freq(double* inv_freq, int hd, double theta) {
  for (int i = threadIdx.x; i < hd / 2; i += blockDim.x) inv_freq[i] = pow(theta, -2.0 * i / hd);
  __syncthreads();
}

// This token's cos/sin, computed by the whole warp and read by any lane.
__device__ inline void fill_trig(float* trig, const double* inv_freq, int32_t pos, int half, int lane) {
  __syncwarp();  // every lane is done with the previous token's values
  for (int i = lane; i < half; i += 32) {
    double s, c;
    sincos(double(pos) * inv_freq[i], &s, &c);
    trig[i] = float(c), trig[half + i] = float(s);
  }
  __syncwarp();
}

template <int kVec, int kGroup, bool kNorm>
__global__ void qk_norm_rope_forward_kernel(__nv_bfloat16* out, float* rstd_NH, const __nv_bfloat16* in,
                                            const __nv_bfloat16* w, const int32_t* pos_N, int N, int H, int hd,
                                            int row_stride, float eps, double theta) {
  constexpr int kSlots = 32 / kGroup;
  extern __shared__ double smem[];
  const int half = hd / 2, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int slot = lane / kGroup, first = (lane % kGroup) * kVec;
  double* inv_freq = smem;
  float* trig = reinterpret_cast<float*>(inv_freq + half) + warp * hd;
  fill_inv_freq(inv_freq, hd, theta);
  for (int n = blockIdx.x * kWarps + warp; n < N; n += gridDim.x * kWarps) {
    fill_trig(trig, inv_freq, pos_N[n], half, lane);
    for (int h0 = 0; h0 < H; h0 += kSlots) {
      const int h = h0 + slot;
      const bool active = h < H;  // idle slots of the last group still join the shuffles
      const size_t base = size_t(n) * row_stride + size_t(h) * hd;
      float r = 1.f;
      if constexpr (kNorm) {
        float ss = 0.f;
        if (active)
          for (int i0 = first; i0 < half; i0 += kGroup * kVec) {
            const Pack<kVec> x0 = load<kVec>(in + base + i0), x1 = load<kVec>(in + base + i0 + half);
#pragma unroll
            for (int k = 0; k < kVec; ++k) ss += x0.v[k] * x0.v[k] + x1.v[k] * x1.v[k];
          }
        r = 1.f / sqrtf(group_sum<kGroup>(ss) / float(hd) + eps);
        if (active && rstd_NH && lane % kGroup == 0) rstd_NH[size_t(n) * H + h] = r;
      }
      if (!active) continue;
      for (int i0 = first; i0 < half; i0 += kGroup * kVec) {
        Pack<kVec> y0 = load<kVec>(in + base + i0), y1 = load<kVec>(in + base + i0 + half);
        if constexpr (kNorm) {
          const Pack<kVec> w0 = load<kVec>(w + i0), w1 = load<kVec>(w + i0 + half);
#pragma unroll
          for (int k = 0; k < kVec; ++k) y0.v[k] = y0.v[k] * r * w0.v[k], y1.v[k] = y1.v[k] * r * w1.v[k];
        }
        Pack<kVec> o0, o1;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float c = trig[i0 + k], s = trig[half + i0 + k];
          o0.v[k] = y0.v[k] * c - y1.v[k] * s;
          o1.v[k] = y1.v[k] * c + y0.v[k] * s;
        }
        store<kVec>(out + base + i0, o0);
        store<kVec>(out + base + i0 + half, o1);
      }
    }
  }
}

// Block b owns tokens [b T, (b + 1) T), T and the block count depending only on N; warp w takes
// every kWarps-th of them. dy = dout rotated by -angle; with norm
//   din_j = r (w_j dy_j - x_j c), c = r^2 (sum_i dy_i w_i x_i) / hd,  dw_j += dy_j x_j r,
// dw summed per (warp, slot) in shared memory, then over warps and slots in a fixed order.
inline int bwd_tokens_per_block(int N) { return std::max(1, (N + kMaxBwdBlocks - 1) / kMaxBwdBlocks); }
inline int bwd_blocks(int N) { return (N + bwd_tokens_per_block(N) - 1) / bwd_tokens_per_block(N); }

template <int kVec, int kGroup, bool kNorm>
__global__ void qk_norm_rope_backward_kernel(__nv_bfloat16* din, float* partial_Ghd, const __nv_bfloat16* dout,
                                             const __nv_bfloat16* in, const __nv_bfloat16* w, const float* rstd_NH,
                                             const int32_t* pos_N, int N, int H, int hd, int row_stride,
                                             double theta, int tokens_per_block) {
  constexpr int kSlots = 32 / kGroup;
  extern __shared__ double smem[];
  const int half = hd / 2, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int slot = lane / kGroup, first = (lane % kGroup) * kVec;
  double* inv_freq = smem;
  float* trig_all = reinterpret_cast<float*>(inv_freq + half);
  float* trig = trig_all + warp * hd;
  float* dw_all = trig_all + kWarps * hd;  // [kWarps][kSlots][hd], used only with kNorm
  float* dw_acc = dw_all + (warp * kSlots + slot) * hd;
  if constexpr (kNorm)
    for (int j = threadIdx.x; j < kWarps * kSlots * hd; j += blockDim.x) dw_all[j] = 0.f;
  fill_inv_freq(inv_freq, hd, theta);  // its barrier also orders the zeroing above

  // On the fast path (kVec = 8) a lane owns the same 2 kVec columns of every head (one chunk per
  // half-row), so dw accumulates in registers; the generic path accumulates in shared memory.
  constexpr bool kRegAcc = kVec == 8;
  float acc0[kVec] = {}, acc1[kVec] = {};
  const int n0 = blockIdx.x * tokens_per_block, n1 = min(N, n0 + tokens_per_block);
  for (int n = n0 + warp; n < n1; n += kWarps) {
    fill_trig(trig, inv_freq, pos_N[n], half, lane);
    for (int h0 = 0; h0 < H; h0 += kSlots) {
      const int h = h0 + slot;
      const bool active = h < H;
      const size_t base = size_t(n) * row_stride + size_t(h) * hd;
      auto rotate_back = [&](int i0, Pack<kVec>& dy0, Pack<kVec>& dy1) {
        const Pack<kVec> d0 = load<kVec>(dout + base + i0), d1 = load<kVec>(dout + base + i0 + half);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float c = trig[i0 + k], s = trig[half + i0 + k];
          dy0.v[k] = d0.v[k] * c + d1.v[k] * s;
          dy1.v[k] = d1.v[k] * c - d0.v[k] * s;
        }
      };
      float r = 0.f, cc = 0.f;
      if constexpr (kNorm) {
        float dot = 0.f;
        if (active) {
          r = rstd_NH[size_t(n) * H + h];
          for (int i0 = first; i0 < half; i0 += kGroup * kVec) {
            Pack<kVec> dy0, dy1;
            rotate_back(i0, dy0, dy1);
            const Pack<kVec> x0 = load<kVec>(in + base + i0), x1 = load<kVec>(in + base + i0 + half);
            const Pack<kVec> w0 = load<kVec>(w + i0), w1 = load<kVec>(w + i0 + half);
#pragma unroll
            for (int k = 0; k < kVec; ++k) dot += dy0.v[k] * w0.v[k] * x0.v[k] + dy1.v[k] * w1.v[k] * x1.v[k];
          }
        }
        cc = r * r * group_sum<kGroup>(dot) / float(hd);
      }
      if (!active) continue;
      for (int i0 = first; i0 < half; i0 += kGroup * kVec) {
        Pack<kVec> dy0, dy1;
        rotate_back(i0, dy0, dy1);
        if constexpr (kNorm) {
          const Pack<kVec> x0 = load<kVec>(in + base + i0), x1 = load<kVec>(in + base + i0 + half);
          const Pack<kVec> w0 = load<kVec>(w + i0), w1 = load<kVec>(w + i0 + half);
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            if constexpr (kRegAcc) {
              acc0[k] += dy0.v[k] * x0.v[k] * r, acc1[k] += dy1.v[k] * x1.v[k] * r;
            } else {
              dw_acc[i0 + k] += dy0.v[k] * x0.v[k] * r, dw_acc[half + i0 + k] += dy1.v[k] * x1.v[k] * r;
            }
            dy0.v[k] = r * (w0.v[k] * dy0.v[k] - x0.v[k] * cc);
            dy1.v[k] = r * (w1.v[k] * dy1.v[k] - x1.v[k] * cc);
          }
        }
        store<kVec>(din + base + i0, dy0);
        store<kVec>(din + base + i0 + half, dy1);
      }
    }
  }
  if constexpr (kNorm) {  // this block's partial dw: (warp, slot) accumulators added in order
    if constexpr (kRegAcc)
#pragma unroll
      for (int k = 0; k < kVec; ++k) dw_acc[first + k] = acc0[k], dw_acc[half + first + k] = acc1[k];
    __syncthreads();
    for (int j = threadIdx.x; j < hd; j += blockDim.x) {
      float s = 0.f;
      for (int q = 0; q < kWarps * kSlots; ++q) s += dw_all[q * hd + j];
      partial_Ghd[size_t(blockIdx.x) * hd + j] = s;
    }
  }
}

void check_shape(const char* op, int N, int H, int hd, int row_stride) {
  MOP_CHECK(N >= 0 && H > 0 && hd > 0 && hd % 2 == 0, "{}: bad shape N={} H={} hd={} (hd must be even)", op, N, H,
            hd);
  MOP_CHECK(row_stride >= H * hd, "{}: row_stride {} < H * hd = {}", op, row_stride, H * hd);
  MOP_CHECK(smem_bytes(hd, true, 1) <= 48 * 1024, "{}: hd={} too large", op, hd);
}

// Lanes per head: hd / 16 on the fast path (16-byte accesses need hd in {64, 128, 256}, row_stride
// % 8 == 0 and 16-byte aligned pointers), else 32. vec2: the generic path's 4-byte accesses.
int lane_group(int hd, int row_stride, std::initializer_list<const void*> ptrs, bool& vec2) {
  bool a16 = true, a4 = true;
  for (const void* p : ptrs) a16 = a16 && (!p || aligned(p, 16)), a4 = a4 && (!p || aligned(p, 4));
  vec2 = hd % 4 == 0 && row_stride % 2 == 0 && a4;
  return (hd == 64 || hd == 128 || hd == 256) && row_stride % 8 == 0 && a16 ? hd / 16 : 32;
}

// Calls launch(kernel, kGroup) with the instantiation for (group, vec2, kNorm).
template <bool kNorm, template <int, int, bool> class K, class Launch>
void dispatch(int group, bool vec2, Launch&& launch) {
  switch (group) {
    case 4: launch(K<8, 4, kNorm>::fn, 4); break;
    case 8: launch(K<8, 8, kNorm>::fn, 8); break;
    case 16: launch(K<8, 16, kNorm>::fn, 16); break;
    default: vec2 ? launch(K<2, 32, kNorm>::fn, 32) : launch(K<1, 32, kNorm>::fn, 32);
  }
}
template <int kVec, int kGroup, bool kNorm> struct Fwd {
  static constexpr auto fn = qk_norm_rope_forward_kernel<kVec, kGroup, kNorm>;
};
template <int kVec, int kGroup, bool kNorm> struct Bwd {
  static constexpr auto fn = qk_norm_rope_backward_kernel<kVec, kGroup, kNorm>;
};

}  // namespace

void qk_norm_rope_forward(__nv_bfloat16* out_NHd, float* rstd_NH, const __nv_bfloat16* in_NHd,
                          const __nv_bfloat16* w_hd, const int32_t* pos_N, int N, int H, int hd, int row_stride,
                          float eps, double theta, cudaStream_t stream) {
  check_shape("qk_norm_rope_forward", N, H, hd, row_stride);
  if (N == 0) return;
  MOP_CHECK(out_NHd && in_NHd && pos_N, "qk_norm_rope_forward: null pointer");
  bool vec2 = false;
  const int group = lane_group(hd, row_stride, {out_NHd, in_NHd, w_hd}, vec2);
  const int blocks = std::min(kMaxFwdBlocks, (N + kWarps - 1) / kWarps);
  const size_t smem = smem_bytes(hd, false, 1);
  auto launch = [&](auto kernel, int) {
    kernel<<<blocks, kWarps * 32, smem, stream>>>(out_NHd, rstd_NH, in_NHd, w_hd, pos_N, N, H, hd, row_stride, eps,
                                                  theta);
  };
  w_hd ? dispatch<true, Fwd>(group, vec2, launch) : dispatch<false, Fwd>(group, vec2, launch);
  MOP_CUDA_LAUNCH_CHECK();
}

size_t qk_norm_rope_backward_scratch_floats(int N, int H, int hd) {
  MOP_CHECK(N >= 0 && H > 0 && hd > 0, "qk_norm_rope_backward_scratch_floats: bad shape N={} H={} hd={}", N, H, hd);
  return N == 0 ? 0 : size_t(bwd_blocks(N)) * hd;
}

namespace {
template <class T>
void backward_impl(__nv_bfloat16* din_NHd, T* dw_hd, const __nv_bfloat16* dout_NHd, const __nv_bfloat16* in_NHd,
                   const __nv_bfloat16* w_hd, const float* rstd_NH, const int32_t* pos_N, int N, int H, int hd,
                   int row_stride, double theta, float* scratch, cudaStream_t stream) {
  check_shape("qk_norm_rope_backward", N, H, hd, row_stride);
  if (N == 0) return;
  MOP_CHECK(din_NHd && dout_NHd && pos_N, "qk_norm_rope_backward: null pointer");
  const bool norm = w_hd != nullptr;
  MOP_CHECK(!norm || (dw_hd && in_NHd && rstd_NH && scratch), "qk_norm_rope_backward: null pointer (norm)");
  bool vec2 = false;
  const int group = lane_group(hd, row_stride, {din_NHd, dout_NHd, norm ? in_NHd : nullptr, w_hd}, vec2);
  const int blocks = bwd_blocks(N), tokens_per_block = bwd_tokens_per_block(N);
  auto launch = [&](auto kernel, int group) {
    const size_t smem = smem_bytes(hd, norm, 32 / group);
    kernel<<<blocks, kWarps * 32, smem, stream>>>(din_NHd, scratch, dout_NHd, in_NHd, w_hd, rstd_NH, pos_N, N, H, hd,
                                                  row_stride, theta, tokens_per_block);
  };
  norm ? dispatch<true, Bwd>(group, vec2, launch) : dispatch<false, Bwd>(group, vec2, launch);
  MOP_CUDA_LAUNCH_CHECK();
  if (norm) add_partial_rows(dw_hd, scratch, blocks, hd, stream);
}

}  // namespace

void qk_norm_rope_backward(__nv_bfloat16* din_NHd, float* dw_hd, const __nv_bfloat16* dout_NHd,
                           const __nv_bfloat16* in_NHd, const __nv_bfloat16* w_hd, const float* rstd_NH,
                           const int32_t* pos_N, int N, int H, int hd, int row_stride, double theta, float* scratch,
                           cudaStream_t stream) {
  backward_impl(din_NHd, dw_hd, dout_NHd, in_NHd, w_hd, rstd_NH, pos_N, N, H, hd, row_stride, theta, scratch, stream);
}

void qk_norm_rope_backward(__nv_bfloat16* din_NHd, __nv_bfloat16* dw_hd, const __nv_bfloat16* dout_NHd,
                           const __nv_bfloat16* in_NHd, const __nv_bfloat16* w_hd, const float* rstd_NH,
                           const int32_t* pos_N, int N, int H, int hd, int row_stride, double theta, float* scratch,
                           cudaStream_t stream) {
  backward_impl(din_NHd, dw_hd, dout_NHd, in_NHd, w_hd, rstd_NH, pos_N, N, H, hd, row_stride, theta, scratch, stream);
}

}  // namespace mop::cuda
