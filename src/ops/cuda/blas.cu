#include <array>

#include "ops/cuda/blas.h"
#include "ops/cuda/check.cuh"

namespace mop::cuda {

const char* cublas_status_name(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_<unknown>";
  }
}

namespace {

// Largest power of two (<= 256, cuBLASLt's default assumption) dividing the address: the heuristic
// is told the real alignment so it never picks a kernel that needs more than the pointer has.
uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && (a % al) != 0) al >>= 1;
  return al;
}

template <class F> struct Scope {
  F f;
  ~Scope() { f(); }
};
template <class F> Scope(F) -> Scope<F>;

}  // namespace

struct BlasHandle::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

BlasHandle::BlasHandle() {
  MOP_CUDA_CHECK(cudaGetDevice(&device_));
  MOP_CUBLAS_CHECK(cublasLtCreate(&lt_));
  MOP_CUDA_CHECK(cudaMalloc(&lt_workspace_, kWorkspaceBytes));
}

BlasHandle::~BlasHandle() {
  // Process-lifetime object: the driver may already be shutting down, so errors are ignored.
  plans_.clear();
  if (blas_) cublasDestroy(blas_);
  if (lt_) cublasLtDestroy(lt_);
  if (lt_workspace_) cudaFree(lt_workspace_);
  if (blas_workspace_) cudaFree(blas_workspace_);
  if (scratch_) cudaFree(scratch_);
}

cublasHandle_t BlasHandle::blas(cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!blas_) {
    MOP_CUBLAS_CHECK(cublasCreate(&blas_));
    MOP_CUDA_CHECK(cudaMalloc(&blas_workspace_, kWorkspaceBytes));
    MOP_CUBLAS_CHECK(cublasSetWorkspace(blas_, blas_workspace_, kWorkspaceBytes));
    // Atomics stay disallowed (the default), which keeps cuBLAS's results reproducible.
    MOP_CUBLAS_CHECK(cublasSetAtomicsMode(blas_, CUBLAS_ATOMICS_NOT_ALLOWED));
    MOP_CUBLAS_CHECK(cublasSetPointerMode(blas_, CUBLAS_POINTER_MODE_HOST));
  }
  // cublasSetStream resets the workspace to the default pool, so set ours again after it.
  MOP_CUBLAS_CHECK(cublasSetStream(blas_, stream));
  MOP_CUBLAS_CHECK(cublasSetWorkspace(blas_, blas_workspace_, kWorkspaceBytes));
  return blas_;
}

void* BlasHandle::scratch(size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (bytes > scratch_bytes_) {
    // cudaFree waits for the device, so no kernel still reads the old buffer.
    if (scratch_) MOP_CUDA_CHECK(cudaFree(scratch_));
    scratch_ = nullptr;
    scratch_bytes_ = 0;
    const size_t want = std::max<size_t>(bytes, 4096);
    MOP_CUDA_CHECK(cudaMalloc(&scratch_, want));
    scratch_bytes_ = want;
  }
  return scratch_;
}

size_t BlasHandle::cached_algorithms() const {
  std::lock_guard<std::mutex> lock(mu_);
  return plans_.size();
}

BlasHandle::Plan& BlasHandle::plan_for(const LtGemm& g, uint32_t align_a, uint32_t align_b, uint32_t align_c,
                                       bool use_c) {
  const Key key{g.transa, g.transb, g.m, g.n, g.k, g.lda, g.ldb, g.ldc, int(g.a_type), int(g.b_type),
                int(g.c_type), align_a, align_b, align_c, use_c};
  std::lock_guard<std::mutex> lock(mu_);
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;

  auto plan = std::make_unique<Plan>();
  MOP_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = g.transa ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t tb = g.transb ? CUBLAS_OP_T : CUBLAS_OP_N;
  MOP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  MOP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  // Stored shapes (before op): A is k x m when transposed, B is n x k when transposed.
  MOP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, g.a_type, g.transa ? g.k : g.m, g.transa ? g.m : g.k, g.lda));
  MOP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, g.b_type, g.transb ? g.n : g.k, g.transb ? g.k : g.n, g.ldb));
  MOP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, g.c_type, g.m, g.n, g.ldc));

  cublasLtMatmulPreference_t pref = nullptr;
  MOP_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  Scope destroy_pref{[&] { cublasLtMatmulPreferenceDestroy(pref); }};
  const uint64_t ws = kWorkspaceBytes;
  MOP_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  const std::array<std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t>, 4> aligns{{
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c},
  }};
  for (const auto& [attr, v] : aligns)
    MOP_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &v, sizeof(v)));

  // Split-K reductions: NONE (no split) or COMPUTE_TYPE (fp32 partials in the workspace, summed by a
  // separate kernel in a fixed order) are deterministic and lose nothing. INPLACE and OUTPUT_TYPE
  // reduce in the output type (bf16 partial sums) and are excluded for precision.
  const uint32_t mask = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  MOP_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask,
                                                        sizeof(mask)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt_, plan->desc, plan->a, plan->b, plan->c, plan->c, pref,
                                                           1, &result, &found);
  MOP_CHECK(st == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS,
            "cuBLASLt found no algorithm ({}) for m={} n={} k={} transa={} transb={} lda={} ldb={} ldc={} "
            "types {}/{}/{} alignments {}/{}/{}",
            cublas_status_name(st), g.m, g.n, g.k, g.transa, g.transb, g.lda, g.ldb, g.ldc, int(g.a_type),
            int(g.b_type), int(g.c_type), align_a, align_b, align_c);
  plan->algo = result.algo;
  return *plans_.emplace(key, std::move(plan)).first->second;
}

void BlasHandle::gemm(const LtGemm& g, const void* A, const void* B, void* C, float beta, cudaStream_t stream) {
  MOP_CHECK(g.m > 0 && g.n > 0 && g.k > 0, "gemm: empty problem m={} n={} k={}", g.m, g.n, g.k);
  Plan& p = plan_for(g, alignment_of(A), alignment_of(B), alignment_of(C), beta != 0.f);
  const float alpha = 1.f;
  MOP_CUBLAS_CHECK(cublasLtMatmul(lt_, p.desc, &alpha, A, p.a, B, p.b, &beta, C, p.c, C, p.c, &p.algo,
                                  lt_workspace_, kWorkspaceBytes, stream));
}

BlasHandle& blas_handle() {
  // One handle per device, created on first use by whichever thread gets there first. Leaked on
  // purpose: destroying cuBLAS handles after the CUDA runtime has shut down at exit can crash.
  static std::mutex mu;
  static auto* handles = new std::map<int, std::unique_ptr<BlasHandle>>();
  int dev = 0;
  MOP_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  auto& h = (*handles)[dev];
  if (!h) h = std::make_unique<BlasHandle>();
  return *h;
}

}  // namespace mop::cuda
