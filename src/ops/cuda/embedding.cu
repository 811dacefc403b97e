#include "ops/cuda/embedding.h"

#include <algorithm>
#include <cub/device/device_radix_sort.cuh>

#include "ops/cuda/check.cuh"

namespace mop::cuda {

namespace {

constexpr int kThreads = 256;
constexpr size_t kMaxBlocks = 8192;

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }
inline size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// ---- forward: a flat grid-stride copy, kVec bf16 per access (8 = 16 bytes, or 1) ----------
template <int kVec> struct alignas(2 * kVec) Chunk {
  __nv_bfloat16 v[kVec];
};

template <int kVec>
__global__ void embedding_forward_kernel(__nv_bfloat16* out_ND, const int32_t* tokens_N,
                                         const __nv_bfloat16* wte_VD, int N, int D, int V) {
  using C = Chunk<kVec>;
  const size_t vecs_per_row = size_t(D) / kVec, total = size_t(N) * vecs_per_row;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const size_t n = i / vecs_per_row, d = (i - n * vecs_per_row) * kVec;
    const int32_t t = tokens_N[n];
    C c{};  // zeros for an out-of-range id: never read outside wte
    if (t >= 0 && t < V) c = *reinterpret_cast<const C*>(wte_VD + size_t(t) * D + d);
    *reinterpret_cast<C*>(out_ND + n * D + d) = c;
  }
}

// ---- backward ------------------------------------------------------------------------------
// Sort keys: the token, or V for an out-of-range id, so bad ids form one run at the end that is
// skipped (and cannot split a valid run, which would make two blocks update one row).
__global__ void make_keys_kernel(uint32_t* keys_N, int32_t* pos_N, const int32_t* tokens_N, int N, int V) {
  for (int n = blockIdx.x * blockDim.x + threadIdx.x; n < N; n += gridDim.x * blockDim.x) {
    const int32_t t = tokens_N[n];
    keys_N[n] = (t >= 0 && t < V) ? uint32_t(t) : uint32_t(V);
    pos_N[n] = n;
  }
}

// Block (i, y) owns columns [y * kRunCols, (y + 1) * kRunCols), two per thread. It works only if
// sorted index i starts a run of equal keys; it then walks the run (positions ascending: the sort
// is stable) adding dout rows onto the dwte row in the CPU op's order, dwte + dout[p0] + dout[p1]
// + ..., so the result is bitwise that of the CPU op. kUnroll rows are loaded before they are
// added so that long runs (frequent tokens) keep several loads in flight.
constexpr int kRunThreads = 128;
constexpr int kRunCols = 2 * kRunThreads;
constexpr int kUnroll = 8;

// Columns d and d + 1 of one bf16 row (d + 1 only when has2); kVec: one aligned 4-byte load.
template <bool kVec> __device__ inline float2 load2(const __nv_bfloat16* src, bool has2) {
  if constexpr (kVec) return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(src));
  return make_float2(__bfloat162float(src[0]), has2 ? __bfloat162float(src[1]) : 0.f);
}

// dwte as T: float, or bf16 (read, summed in fp32, rounded once on the store).
template <class T> __device__ __forceinline__ float2 load_dst(const T* dst, bool vec, bool has2) {
  if constexpr (sizeof(T) == 4) {
    return vec ? *reinterpret_cast<const float2*>(dst) : make_float2(dst[0], has2 ? dst[1] : 0.f);
  } else {
    return vec ? __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(dst))
               : make_float2(__bfloat162float(dst[0]), has2 ? __bfloat162float(dst[1]) : 0.f);
  }
}
template <class T> __device__ __forceinline__ void store_dst(T* dst, float2 acc, bool vec, bool has2) {
  if constexpr (sizeof(T) == 4) {
    if (vec) {
      *reinterpret_cast<float2*>(dst) = acc;
    } else {
      dst[0] = acc.x;
      if (has2) dst[1] = acc.y;
    }
  } else {
    if (vec) {
      *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(acc.x, acc.y);
    } else {
      dst[0] = __float2bfloat16_rn(acc.x);
      if (has2) dst[1] = __float2bfloat16_rn(acc.y);
    }
  }
}

template <bool kVec, class T>
__global__ void accumulate_runs_kernel(T* dwte_VD, const __nv_bfloat16* dout_ND, const uint32_t* keys_sorted_N,
                                       const int32_t* pos_sorted_N, int N, int D, int V) {
  const int i = blockIdx.x;
  const uint32_t key = keys_sorted_N[i];
  if (key >= uint32_t(V)) return;                         // out-of-range ids
  if (i > 0 && keys_sorted_N[i - 1] == key) return;       // not the start of a run
  const int d = blockIdx.y * kRunCols + 2 * threadIdx.x;  // this thread's columns d, d + 1
  if (d >= D) return;
  const bool has2 = d + 1 < D;  // always true on the kVec path (D even)
  T* dst = dwte_VD + size_t(key) * D + d;
  float2 acc = load_dst(dst, kVec, has2);
  for (int j0 = i;; j0 += kUnroll) {
    // Sorted keys: the rows still in the run form a prefix of this batch.
    float2 x[kUnroll];
    bool in_run[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u;
      in_run[u] = j < N && keys_sorted_N[j] == key;
      x[u] = in_run[u] ? load2<kVec>(dout_ND + size_t(pos_sorted_N[j]) * D + d, has2) : make_float2(0.f, 0.f);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (in_run[u]) acc.x += x[u].x, acc.y += x[u].y;
    if (!in_run[kUnroll - 1]) break;
  }
  store_dst(dst, acc, kVec, has2);
}

// Workspace layout: keys and positions, each double-buffered for cub, then cub's temp storage.
struct Layout {
  size_t keys_a, keys_b, pos_a, pos_b, temp, total;
};
Layout layout(int N, size_t temp_bytes) {
  const size_t arr = align256(size_t(N) * 4);
  Layout l{};
  l.keys_a = 0, l.keys_b = arr, l.pos_a = 2 * arr, l.pos_b = 3 * arr, l.temp = 4 * arr;
  l.total = l.temp + align256(temp_bytes);
  return l;
}

size_t cub_temp_bytes(int N, int end_bit) {
  cub::DoubleBuffer<uint32_t> keys(nullptr, nullptr);
  cub::DoubleBuffer<int32_t> pos(nullptr, nullptr);
  size_t bytes = 0;
  MOP_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, pos, N, 0, end_bit));
  return bytes;
}

}  // namespace

void embedding_forward(__nv_bfloat16* out_ND, const int32_t* tokens_N, const __nv_bfloat16* wte_VD, int N, int D,
                       int V, cudaStream_t stream) {
  MOP_CHECK(N >= 0 && D >= 0 && V > 0, "embedding_forward: bad shape N={} D={} V={}", N, D, V);
  if (N == 0 || D == 0) return;
  MOP_CHECK(out_ND && tokens_N && wte_VD, "embedding_forward: null pointer");
  const size_t total = size_t(N) * D;
  if (D % 8 == 0 && aligned(out_ND, 16) && aligned(wte_VD, 16)) {
    const size_t blocks = std::min(kMaxBlocks, (total / 8 + kThreads - 1) / kThreads);
    embedding_forward_kernel<8><<<unsigned(blocks), kThreads, 0, stream>>>(out_ND, tokens_N, wte_VD, N, D, V);
  } else {
    const size_t blocks = std::min(kMaxBlocks, (total + kThreads - 1) / kThreads);
    embedding_forward_kernel<1><<<unsigned(blocks), kThreads, 0, stream>>>(out_ND, tokens_N, wte_VD, N, D, V);
  }
  MOP_CUDA_LAUNCH_CHECK();
}

size_t embedding_backward_workspace(int N) {
  MOP_CHECK(N >= 0, "embedding_backward_workspace: bad N={}", N);
  // The most radix bits any V can need (keys are < 2^31); fewer bits never need more storage,
  // and embedding_backward checks the size it actually needs anyway.
  return layout(N, cub_temp_bytes(N, 32)).total;
}

namespace {
template <class T>
void backward_impl(T* dwte_VD, const __nv_bfloat16* dout_ND, const int32_t* tokens_N, int N, int D, int V,
                   void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  MOP_CHECK(N >= 0 && D >= 0 && V > 0, "embedding_backward: bad shape N={} D={} V={}", N, D, V);
  if (N == 0 || D == 0) return;
  MOP_CHECK(dwte_VD && dout_ND && tokens_N && workspace, "embedding_backward: null pointer");
  MOP_CHECK(aligned(workspace, 256), "embedding_backward: workspace must be 256-byte aligned");
  MOP_CHECK((D + kRunCols - 1) / kRunCols <= 65535, "embedding_backward: D={} too large", D);

  // Keys are in [0, V]: sort only the bits V needs.
  int end_bit = 1;
  while (end_bit < 32 && (uint64_t(V) >> end_bit) != 0) ++end_bit;
  const size_t temp_bytes = cub_temp_bytes(N, end_bit);
  const Layout l = layout(N, temp_bytes);
  MOP_CHECK(workspace_bytes >= l.total, "embedding_backward: workspace {} bytes, needs {}", workspace_bytes, l.total);

  char* ws = static_cast<char*>(workspace);
  auto* keys_a = reinterpret_cast<uint32_t*>(ws + l.keys_a);
  auto* keys_b = reinterpret_cast<uint32_t*>(ws + l.keys_b);
  auto* pos_a = reinterpret_cast<int32_t*>(ws + l.pos_a);
  auto* pos_b = reinterpret_cast<int32_t*>(ws + l.pos_b);

  const int key_blocks = int(std::min<size_t>(kMaxBlocks, (size_t(N) + kThreads - 1) / kThreads));
  make_keys_kernel<<<key_blocks, kThreads, 0, stream>>>(keys_a, pos_a, tokens_N, N, V);
  MOP_CUDA_LAUNCH_CHECK();

  // Radix sort is stable: equal tokens keep ascending positions. The DoubleBuffer selectors are
  // set on the host by the call, so Current() is valid right after it.
  cub::DoubleBuffer<uint32_t> keys(keys_a, keys_b);
  cub::DoubleBuffer<int32_t> pos(pos_a, pos_b);
  size_t temp_avail = temp_bytes;
  MOP_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(ws + l.temp, temp_avail, keys, pos, N, 0, end_bit, stream));

  const dim3 grid(unsigned(N), unsigned((D + kRunCols - 1) / kRunCols));
  if (D % 2 == 0 && aligned(dwte_VD, 2 * sizeof(T)) && aligned(dout_ND, 4)) {
    accumulate_runs_kernel<true><<<grid, kRunThreads, 0, stream>>>(dwte_VD, dout_ND, keys.Current(), pos.Current(),
                                                                   N, D, V);
  } else {
    accumulate_runs_kernel<false><<<grid, kRunThreads, 0, stream>>>(dwte_VD, dout_ND, keys.Current(),
                                                                    pos.Current(), N, D, V);
  }
  MOP_CUDA_LAUNCH_CHECK();
}

}  // namespace

void embedding_backward(float* dwte_VD, const __nv_bfloat16* dout_ND, const int32_t* tokens_N, int N, int D, int V,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  backward_impl(dwte_VD, dout_ND, tokens_N, N, D, V, workspace, workspace_bytes, stream);
}

void embedding_backward(__nv_bfloat16* dwte_VD, const __nv_bfloat16* dout_ND, const int32_t* tokens_N, int N, int D,
                        int V, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  backward_impl(dwte_VD, dout_ND, tokens_N, N, D, V, workspace, workspace_bytes, stream);
}

}  // namespace mop::cuda
