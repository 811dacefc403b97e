// Grouped expert GEMMs. The cuBLAS backend issues one cublasGemmGroupedBatchedEx per product (one
// group per non-empty expert, since every expert has its own row count). Its sizes come from the
// host offsets; its per-group matrix pointers must live on the device, and are written there by a
// tiny kernel from the device offsets: nothing is staged through host memory, so there is no pinned
// buffer to recycle and no host/device hazard between consecutive calls.
// The CUTLASS backend (grouped_matmul_cutlass.cu) does the same with its own per-group arrays.
#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "ops/cuda/blas.h"
#include "ops/cuda/check.cuh"
#include "ops/cuda/grouped_matmul.h"
#include "ops/cuda/grouped_matmul_cutlass.h"

namespace mop::cuda {
namespace {

enum class Backend { cublas, cutlass };
// CUTLASS by default: 708 vs 329 TFLOP/s forward on the moe-7b expert shapes (H200); cuBLAS stays as the
// fallback for shapes CUTLASS cannot take (I or O not a multiple of 8).
std::atomic<Backend> g_backend{Backend::cutlass};

// Where matrix e of one operand starts: base + e * expert_stride + offsets[e] * row_stride (bytes).
struct PtrSpec {
  const char* base;
  int64_t expert_stride;
  int64_t row_stride;
};
struct PtrSpecs {
  PtrSpec s[3];  // A, B, C of cuBLAS's (column-major) call
};

// out[t * E + g] = pointer of operand t for the g-th non-empty expert (the order the host uses).
static __global__ void build_group_pointers_kernel(const int32_t* __restrict__ offsets, int E, PtrSpecs specs,
                                                   const void** __restrict__ out) {
  extern __shared__ int32_t off[];
  for (int i = threadIdx.x; i <= E; i += blockDim.x) off[i] = offsets[i];
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    if (off[e + 1] == off[e]) continue;
    int slot = 0;
    for (int j = 0; j < e; ++j) slot += off[j + 1] > off[j];
    for (int t = 0; t < 3; ++t)
      out[t * E + slot] = specs.s[t].base + int64_t(e) * specs.s[t].expert_stride + int64_t(off[e]) * specs.s[t].row_stride;
  }
}

// Validates the host offsets and returns the non-empty experts.
std::vector<int> nonempty_experts(const char* op, const int32_t* offsets, int E, int I, int O) {
  MOP_CHECK(E > 0 && I > 0 && O > 0, "{}: bad shape E={} I={} O={}", op, E, I, O);
  MOP_CHECK(offsets != nullptr, "{}: host offsets are required", op);
  MOP_CHECK(offsets[0] >= 0, "{}: offsets[0] = {} is negative", op, offsets[0]);
  std::vector<int> experts;
  for (int e = 0; e < E; ++e) {
    MOP_CHECK(offsets[e + 1] >= offsets[e], "{}: offsets decrease at expert {} ({} > {})", op, e, offsets[e],
              offsets[e + 1]);
    if (offsets[e + 1] > offsets[e]) experts.push_back(e);
  }
  return experts;
}

// One grouped product through cuBLAS: group g (expert experts[g]) computes, column-major,
// C_g (m x n_g) = op(A_g) op(B_g) with n_g = that expert's row count (the varying dimension in y and
// dx), m and k fixed. `ptrs` is the device array written by build_group_pointers_kernel.
void cublas_grouped(const std::vector<int>& experts, const int32_t* offsets_host, bool transa, int m, int k, int lda,
                    int ldb, int ldc, const void** ptrs, int E, cudaStream_t stream) {
  const int G = int(experts.size());
  std::vector<cublasOperation_t> ta(G, transa ? CUBLAS_OP_T : CUBLAS_OP_N), tb(G, CUBLAS_OP_N);
  std::vector<int> ms(G, m), ns(G), ks(G, k), ldas(G, lda), ldbs(G, ldb), ldcs(G, ldc), sizes(G, 1);
  std::vector<float> alpha(G, 1.f), beta(G, 0.f);
  for (int g = 0; g < G; ++g) ns[g] = offsets_host[experts[g] + 1] - offsets_host[experts[g]];
  cublasHandle_t h = blas_handle().blas(stream);
  MOP_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(h, ta.data(), tb.data(), ms.data(), ns.data(), ks.data(), alpha.data(),
                                              ptrs, CUDA_R_16BF, ldas.data(), ptrs + E, CUDA_R_16BF, ldbs.data(),
                                              beta.data(), const_cast<void* const*>(ptrs + 2 * E), CUDA_R_16BF,
                                              ldcs.data(), G, sizes.data(), CUBLAS_COMPUTE_32F));
}

const void** build_pointers(const int32_t* offsets_device, int E, const PtrSpecs& specs, cudaStream_t stream) {
  auto** ptrs = static_cast<const void**>(blas_handle().scratch(size_t(3) * E * sizeof(void*)));
  const int threads = std::min(256, ((E + 31) / 32) * 32);
  build_group_pointers_kernel<<<1, threads, size_t(E + 1) * sizeof(int32_t), stream>>>(offsets_device, E, specs, ptrs);
  MOP_CUDA_LAUNCH_CHECK();
  return ptrs;
}

// CUTLASS's TMA kernels need 16-byte aligned rows; other sizes take the cuBLAS path.
bool use_cutlass(int I, int O) { return g_backend.load() == Backend::cutlass && detail::cutlass_grouped_supported(I, O); }

thread_local int g_sm_limit = 0;  // GroupedSmLimit

}  // namespace

int detail::grouped_sm_limit() { return g_sm_limit; }

GroupedSmLimit::GroupedSmLimit(int sms) : prev_(g_sm_limit) {
  MOP_CHECK(sms >= 0, "GroupedSmLimit: {} SMs", sms);
  g_sm_limit = sms;
}
GroupedSmLimit::~GroupedSmLimit() { g_sm_limit = prev_; }

void set_grouped_gemm_backend(const char* name) {
  const std::string n = name ? name : "";
  if (n == "cublas")
    g_backend = Backend::cublas;
  else if (n == "cutlass")
    g_backend = Backend::cutlass;
  else
    MOP_FAIL("unknown grouped GEMM backend '{}' (expected 'cublas' or 'cutlass')", n);
}

const char* grouped_gemm_backend() { return g_backend.load() == Backend::cublas ? "cublas" : "cutlass"; }

void grouped_matmul_forward(__nv_bfloat16* y_MO, const __nv_bfloat16* x_MI, const __nv_bfloat16* w_EOI,
                            const int32_t* offsets_E1_device, const int32_t* offsets_E1_host, int E, int I, int O,
                            cudaStream_t stream) {
  const std::vector<int> experts = nonempty_experts("grouped_matmul_forward", offsets_E1_host, E, I, O);
  if (experts.empty()) return;
  if (use_cutlass(I, O))
    return detail::cutlass_grouped_forward(y_MO, x_MI, w_EOI, offsets_E1_device, offsets_E1_host, experts, E, I, O,
                                           stream);
  const int64_t b = sizeof(__nv_bfloat16);
  // y_e^T (O x n_e, ld O) = op(w_e) (O x I; w_e's storage is the col-major I x O matrix, ld I) * x_e^T (ld I).
  const PtrSpecs specs{{{reinterpret_cast<const char*>(w_EOI), int64_t(O) * I * b, 0},
                        {reinterpret_cast<const char*>(x_MI), 0, int64_t(I) * b},
                        {reinterpret_cast<const char*>(y_MO), 0, int64_t(O) * b}}};
  const void** ptrs = build_pointers(offsets_E1_device, E, specs, stream);
  cublas_grouped(experts, offsets_E1_host, /*transa=*/true, O, I, /*lda=*/I, /*ldb=*/I, /*ldc=*/O, ptrs, E, stream);
}

namespace {
template <class T> cudaDataType_t data_type() { return sizeof(T) == 4 ? CUDA_R_32F : CUDA_R_16BF; }

template <class T>
void backward_impl(__nv_bfloat16* dx_MI, T* dw_EOI, const __nv_bfloat16* dy_MO, const __nv_bfloat16* x_MI,
                   const __nv_bfloat16* w_EOI, const int32_t* offsets_E1_device, const int32_t* offsets_E1_host, int E,
                   int I, int O, cudaStream_t stream, bool dw_overwrite) {
  const std::vector<int> experts = nonempty_experts("grouped_matmul_backward", offsets_E1_host, E, I, O);
  // Overwriting: the bf16 CUTLASS product stores without reading dw; every other path, and the
  // experts with no rows, accumulate into zeros instead.
  const bool store = dw_overwrite && dw_EOI && sizeof(T) == 2 && use_cutlass(I, O);
  if (dw_overwrite && dw_EOI) {  // zeros: runs of experts the product does not store
    std::vector<char> stored(size_t(E), 0);
    if (store)
      for (int e : experts) stored[size_t(e)] = 1;
    for (int e = 0; e < E;) {
      if (stored[size_t(e)]) {
        ++e;
        continue;
      }
      int end = e + 1;
      while (end < E && !stored[size_t(end)]) ++end;
      MOP_CUDA_CHECK(cudaMemsetAsync(dw_EOI + size_t(e) * O * I, 0, size_t(end - e) * O * I * sizeof(T), stream));
      e = end;
    }
  }
  if (experts.empty()) return;
  if (use_cutlass(I, O)) {
    if (dx_MI)
      detail::cutlass_grouped_dgrad(dx_MI, dy_MO, w_EOI, offsets_E1_device, offsets_E1_host, experts, E, I, O, stream);
    if (dw_EOI) {
      if constexpr (sizeof(T) == 2)
        detail::cutlass_grouped_wgrad(dw_EOI, dy_MO, x_MI, offsets_E1_device, offsets_E1_host, experts, E, I, O, store,
                                      stream);
      else
        detail::cutlass_grouped_wgrad(dw_EOI, dy_MO, x_MI, offsets_E1_device, offsets_E1_host, experts, E, I, O, stream);
    }
    return;
  }
  const int64_t b = sizeof(__nv_bfloat16);
  if (dx_MI) {
    // dx_e^T (I x n_e, ld I) = w_e^T (I x O: w_e's storage, ld I) * dy_e^T (O x n_e: dy_e's storage, ld O).
    const PtrSpecs specs{{{reinterpret_cast<const char*>(w_EOI), int64_t(O) * I * b, 0},
                          {reinterpret_cast<const char*>(dy_MO), 0, int64_t(O) * b},
                          {reinterpret_cast<const char*>(dx_MI), 0, int64_t(I) * b}}};
    const void** ptrs = build_pointers(offsets_E1_device, E, specs, stream);
    cublas_grouped(experts, offsets_E1_host, /*transa=*/false, I, O, /*lda=*/I, /*ldb=*/O, /*ldc=*/I, ptrs, E, stream);
  }
  if (dw_EOI) {
    // cublasGemmGroupedBatchedEx rejects bf16 inputs with an fp32 C (CUBLAS_STATUS_NOT_SUPPORTED on
    // cuBLAS 13.1), and rounding each step's dw to bf16 before the fp32 accumulation would lose the
    // precision the fp32 gradient exists for. So: one cublasGemmEx per non-empty expert, beta = 1.
    // dw_e^T (I x O, ld I) += x_e^T (I x n_e: x_e's storage, ld I) * dy_e (n_e x O: dy_e's storage^T, ld O).
    cublasHandle_t h = blas_handle().blas(stream);
    const float one = 1.f;
    for (int e : experts) {
      const int r0 = offsets_E1_host[e], rows = offsets_E1_host[e + 1] - r0;
      MOP_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, I, O, rows, &one, x_MI + size_t(r0) * I, CUDA_R_16BF,
                                    I, dy_MO + size_t(r0) * O, CUDA_R_16BF, O, &one, dw_EOI + size_t(e) * O * I,
                                    data_type<T>(), I, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  }
}

}  // namespace

void grouped_matmul_backward(__nv_bfloat16* dx_MI, float* dw_EOI, const __nv_bfloat16* dy_MO,
                             const __nv_bfloat16* x_MI, const __nv_bfloat16* w_EOI, const int32_t* offsets_E1_device,
                             const int32_t* offsets_E1_host, int E, int I, int O, cudaStream_t stream,
                             bool dw_overwrite) {
  backward_impl(dx_MI, dw_EOI, dy_MO, x_MI, w_EOI, offsets_E1_device, offsets_E1_host, E, I, O, stream, dw_overwrite);
}

void grouped_matmul_backward(__nv_bfloat16* dx_MI, __nv_bfloat16* dw_EOI, const __nv_bfloat16* dy_MO,
                             const __nv_bfloat16* x_MI, const __nv_bfloat16* w_EOI, const int32_t* offsets_E1_device,
                             const int32_t* offsets_E1_host, int E, int I, int O, cudaStream_t stream,
                             bool dw_overwrite) {
  backward_impl(dx_MI, dw_EOI, dy_MO, x_MI, w_EOI, offsets_E1_device, offsets_E1_host, E, I, O, stream, dw_overwrite);
}

}  // namespace mop::cuda
