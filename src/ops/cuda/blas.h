// cuBLAS / cuBLASLt glue shared by the GEMM ops: one handle per device with a fixed workspace and a
// cache of cuBLASLt algorithms keyed by problem shape, so each shape's algorithm is chosen once and
// every later call with that shape runs the same kernel (same bits run to run).
// Plain C++ header: cuBLAS's headers are C.
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "core/error.h"

namespace mop::cuda {
// "CUBLAS_STATUS_NOT_SUPPORTED" (cuBLASLt shares cuBLAS's status codes).
const char* cublas_status_name(cublasStatus_t status);
}  // namespace mop::cuda

#define MOP_CUBLAS_CHECK(call)                                                                    \
  do {                                                                                           \
    cublasStatus_t st_ = (call);                                                                 \
    if (st_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                                               \
      throw ::mop::Error(::fmt::format("cuBLAS error {} in {}", ::mop::cuda::cublas_status_name(st_), \
                                       #call),                                                   \
                         __FILE__, __LINE__);                                                    \
  } while (0)

namespace mop::cuda {

// One column-major GEMM in cuBLAS's convention, alpha = 1, fp32 compute and scale:
//   C(m x n) = op(A) op(B) + beta * C,  op(A) is m x k, op(B) is k x n.
// A stored (transa ? k x m : m x k) with leading dimension lda, likewise B; C is m x n, ldc.
struct LtGemm {
  bool transa = false, transb = false;
  int64_t m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldc = 0;
  cudaDataType_t a_type = CUDA_R_16BF, b_type = CUDA_R_16BF, c_type = CUDA_R_16BF;
};

class BlasHandle {
 public:
  static constexpr size_t kWorkspaceBytes = size_t(32) << 20;

  BlasHandle();  // on the current device
  ~BlasHandle();
  BlasHandle(const BlasHandle&) = delete;
  BlasHandle& operator=(const BlasHandle&) = delete;

  cublasLtHandle_t lt() const { return lt_; }
  // Classic cuBLAS handle (grouped GEMM, per-expert fallbacks), bound to `stream` and to its own
  // fixed workspace: cuBLAS picks algorithms by the workspace it has, so a fixed one keeps the pick
  // (and the bits) the same run to run.
  cublasHandle_t blas(cudaStream_t stream);

  // Runs g on `stream` with the cached algorithm for (g, pointer alignments, beta != 0), choosing it
  // on first use. Deterministic: only algorithms without split-K or with a separate fp32 reduction
  // (fixed order, no atomics) are allowed. Pointers are device pointers; C is read when beta != 0.
  void gemm(const LtGemm& g, const void* A, const void* B, void* C, float beta, cudaStream_t stream);

  // A grow-only device scratch buffer (pointer arrays of the grouped GEMMs). Stream-ordered reuse
  // only: callers on one stream may reuse it freely; see the note on streams below.
  void* scratch(size_t bytes);

  size_t cached_algorithms() const;

  // Streams: the workspaces and the scratch buffer are single buffers, so two GEMMs on two
  // different streams must not run concurrently through the same handle. The engine runs its GEMMs
  // on one compute stream; a second concurrent stream would need its own BlasHandle.

 private:
  struct Plan;
  using Key = std::tuple<int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int, uint32_t,
                         uint32_t, uint32_t, bool>;
  Plan& plan_for(const LtGemm& g, uint32_t align_a, uint32_t align_b, uint32_t align_c, bool use_c);

  int device_ = 0;
  cublasLtHandle_t lt_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  void* lt_workspace_ = nullptr;
  void* blas_workspace_ = nullptr;
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  mutable std::mutex mu_;
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

// The handle of the current device, created on first use (one per device, process lifetime).
BlasHandle& blas_handle();

}  // namespace mop::cuda
