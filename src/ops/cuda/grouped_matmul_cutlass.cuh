// Internal to the CUTLASS grouped GEMM translation units (grouped_matmul_cutlass*.cu): the kernel
// configuration and the launch path shared by every product. Each product is instantiated in one
// .cu only (about a minute of nvcc each), and the products are spread over two files so that they
// compile in parallel.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <algorithm>
#include <vector>

#include "ops/cuda/blas.h"
#include "ops/cuda/check.cuh"
#include "ops/cuda/grouped_matmul_cutlass.h"

namespace mop::cuda::detail {
namespace {

using namespace cute;
using bf16_t = cutlass::bfloat16_t;
using RowMajor = cutlass::layout::RowMajor;
using ColMajor = cutlass::layout::ColumnMajor;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per group
using Mnk = ProblemShape::UnderlyingProblemShape;

// Cooperative: both consumer warpgroups on one 128 x 256 tile. Pingpong: each warpgroup on its own
// tile, one's epilogue under the other's mainloop.
struct Cooperative {
  using Tile = Shape<_128, _256, _64>;
  using Cluster = Shape<_2, _1, _1>;
  using Mainloop = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
template <class TileShape_> struct Pingpong {
  using Tile = TileShape_;
  using Cluster = Shape<_2, _1, _1>;
  using Mainloop = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

template <class LayoutA, class LayoutB, class ElementC, class ElementD, class Sched = Cooperative> struct Config {
  using TileShape = typename Sched::Tile;
  using ClusterShape = typename Sched::Cluster;
  static constexpr bool kReadsC = !cute::is_void_v<ElementC>;  // D = acc + C, else D = acc
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  static constexpr int kAlignC = cute::is_void_v<ElementC> ? kAlignD : 128 / cutlass::sizeof_bits<ElementC>::value;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, RowMajor*, kAlignC, ElementD, RowMajor*,
      kAlignD, typename Sched::Epilogue,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, ElementC, float>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, bf16_t, LayoutA*, 8, bf16_t, LayoutB*, 8, float, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Sched::Mainloop>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideC = typename Kernel::InternalStrideC;
  using StrideD = typename Kernel::InternalStrideD;
};

using Fwd = Config<RowMajor, ColMajor, void, bf16_t>;
using Dgrad = Config<RowMajor, RowMajor, void, bf16_t>;
using Wgrad = Config<ColMajor, RowMajor, float, float>;
using Wgrad16 = Config<ColMajor, RowMajor, bf16_t, bf16_t>;  // bf16 gradients: fp32 sum, rounded once
// bf16 gradients written, not read. Pingpong: each expert's K is its row count (about 1,000 on
// moe-7b), so a tile's mainloop is short and the cooperative kernel's unhidden epilogue showed: on
// the moe-7b gate|up product 633 us against 682 (0.87 of the dense product's rate against 0.80);
// the down product 318 us either way; a 64 x 256 pingpong tile was no better (H200, 2026-11-29).
using Wgrad16Store = Config<ColMajor, RowMajor, void, bf16_t, Pingpong<Shape<_128, _128, _64>>>;

// A packed rank-3 cute stride (one dynamic mode, the leading dimension; the other is _1, batch _0).
template <class Stride> Stride leading_stride(int64_t ld) {
  Stride s{};
  if constexpr (cute::is_integral<cute::remove_cvref_t<decltype(get<0>(s))>>::value &&
                !cute::is_static<cute::remove_cvref_t<decltype(get<0>(s))>>::value)
    get<0>(s) = ld;
  else
    get<1>(s) = ld;
  return s;
}

// Where operand t of expert e starts: base + e * expert_stride + offsets[e] * row_stride (bytes).
struct Operand {
  const char* base;
  int64_t expert_stride;
  int64_t row_stride;
};

template <class C> struct SetupArgs {
  Operand a, b, c, d;
  typename C::StrideA sa;
  typename C::StrideB sb;
  typename C::StrideC sc;
  typename C::StrideD sd;
  Mnk fixed;      // problem shape with the varying mode left to fill
  int vary_mode;  // 0: M, 2: K is the expert's row count
};

template <class C> struct Arrays {
  const void** a;
  const void** b;
  const void** c;
  void** d;
  typename C::StrideA* sa;
  typename C::StrideB* sb;
  typename C::StrideC* sc;
  typename C::StrideD* sd;
  Mnk* shapes;
};

template <class C>
static __global__ void setup_groups_kernel(const int32_t* __restrict__ offsets, int E, SetupArgs<C> s, Arrays<C> out) {
  extern __shared__ int32_t off[];
  for (int i = threadIdx.x; i <= E; i += blockDim.x) off[i] = offsets[i];
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    int g = 0;
    for (int j = 0; j < e; ++j) g += off[j + 1] > off[j];
    auto at = [&](const Operand& o) { return o.base + int64_t(e) * o.expert_stride + int64_t(off[e]) * o.row_stride; };
    out.a[g] = at(s.a), out.b[g] = at(s.b), out.c[g] = s.c.base ? at(s.c) : nullptr;
    out.d[g] = const_cast<char*>(at(s.d));
    out.sa[g] = s.sa, out.sb[g] = s.sb, out.sc[g] = s.sc, out.sd[g] = s.sd;
    Mnk p = s.fixed;
    if (s.vary_mode == 0) get<0>(p) = rows;
    else get<2>(p) = rows;
    out.shapes[g] = p;
  }
}

size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

int sm_count() {
  static thread_local int dev = -1, count = 0;
  int d = 0;
  MOP_CUDA_CHECK(cudaGetDevice(&d));
  if (d != dev) {
    MOP_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, d));
    dev = d;
  }
  // A limit is rounded down to whole 2-SM clusters (the kernels' cluster shape), at least one.
  const int limit = grouped_sm_limit();
  return limit > 0 && limit < count ? std::max(2, limit & ~1) : count;
}

template <class C>
void run(const char* what, const std::vector<Mnk>& host_shapes, const int32_t* offsets_device, int E,
         const SetupArgs<C>& s, float beta, cudaStream_t stream) {
  using Gemm = typename C::Gemm;
  const int G = int(host_shapes.size());
  // Scratch layout: 4 pointer arrays, 4 stride arrays, shapes, then CUTLASS's workspace.
  const size_t n_ptr = align_up(sizeof(void*) * E), n_sa = align_up(sizeof(typename C::StrideA) * E),
               n_sb = align_up(sizeof(typename C::StrideB) * E), n_sc = align_up(sizeof(typename C::StrideC) * E),
               n_sd = align_up(sizeof(typename C::StrideD) * E), n_shape = align_up(sizeof(Mnk) * E);
  const size_t n_arrays = 4 * n_ptr + n_sa + n_sb + n_sc + n_sd + n_shape;

  typename Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.hw_info.device_id = 0;
  MOP_CUDA_CHECK(cudaGetDevice(&args.hw_info.device_id));
  args.hw_info.sm_count = sm_count();
  // Sizes first (pointers are patched below once the scratch buffer is known).
  args.problem_shape = {G, nullptr, host_shapes.data()};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = beta;
  const size_t n_ws = align_up(Gemm::get_workspace_size(args));
  char* base = static_cast<char*>(blas_handle().scratch(n_arrays + n_ws));

  Arrays<C> arr;
  char* p = base;
  arr.a = reinterpret_cast<const void**>(p), p += n_ptr;
  arr.b = reinterpret_cast<const void**>(p), p += n_ptr;
  arr.c = reinterpret_cast<const void**>(p), p += n_ptr;
  arr.d = reinterpret_cast<void**>(p), p += n_ptr;
  arr.sa = reinterpret_cast<typename C::StrideA*>(p), p += n_sa;
  arr.sb = reinterpret_cast<typename C::StrideB*>(p), p += n_sb;
  arr.sc = reinterpret_cast<typename C::StrideC*>(p), p += n_sc;
  arr.sd = reinterpret_cast<typename C::StrideD*>(p), p += n_sd;
  arr.shapes = reinterpret_cast<Mnk*>(p), p += n_shape;
  void* workspace = p;

  const int threads = std::min(256, ((E + 31) / 32) * 32);
  setup_groups_kernel<C><<<1, threads, size_t(E + 1) * sizeof(int32_t), stream>>>(offsets_device, E, s, arr);
  MOP_CUDA_LAUNCH_CHECK();

  args.problem_shape = {G, arr.shapes, host_shapes.data()};
  args.mainloop.ptr_A = reinterpret_cast<decltype(args.mainloop.ptr_A)>(arr.a);
  args.mainloop.dA = arr.sa;
  args.mainloop.ptr_B = reinterpret_cast<decltype(args.mainloop.ptr_B)>(arr.b);
  args.mainloop.dB = arr.sb;
  args.epilogue.ptr_C = s.c.base ? reinterpret_cast<decltype(args.epilogue.ptr_C)>(arr.c) : nullptr;
  args.epilogue.dC = arr.sc;
  args.epilogue.ptr_D = reinterpret_cast<decltype(args.epilogue.ptr_D)>(arr.d);
  args.epilogue.dD = arr.sd;

  Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  MOP_CHECK(st == cutlass::Status::kSuccess, "CUTLASS grouped {}: cannot implement ({})", what,
            cutlassGetStatusString(st));
  st = gemm.initialize(args, workspace, stream);
  MOP_CHECK(st == cutlass::Status::kSuccess, "CUTLASS grouped {}: initialize failed ({})", what,
            cutlassGetStatusString(st));
  st = gemm.run(stream);
  MOP_CHECK(st == cutlass::Status::kSuccess, "CUTLASS grouped {}: run failed ({})", what, cutlassGetStatusString(st));
  MOP_CUDA_LAUNCH_CHECK();
}

std::vector<Mnk> shapes_of(const std::vector<int>& experts, const int32_t* offsets_host, Mnk fixed, int vary_mode) {
  std::vector<Mnk> v;
  v.reserve(experts.size());
  for (int e : experts) {
    Mnk p = fixed;
    const int rows = offsets_host[e + 1] - offsets_host[e];
    if (vary_mode == 0) get<0>(p) = rows;
    else get<2>(p) = rows;
    v.push_back(p);
  }
  return v;
}

constexpr int64_t kB = 2;  // bytes per bf16

// dw_e (O x I) += dy_e^T @ x_e in place (C = D = dw), T the gradient's storage (float or bf16);
// a C that reads no source (Wgrad16Store) writes dw_e = dy_e^T @ x_e.
template <class C, class T>
void grouped_wgrad(T* dw, const __nv_bfloat16* dy, const __nv_bfloat16* x, const int32_t* offsets_device,
                   const int32_t* offsets_host, const std::vector<int>& experts, int E, int I, int O,
                   cudaStream_t stream) {
  SetupArgs<C> s{};
  s.a = {reinterpret_cast<const char*>(dy), 0, O * kB};
  s.b = {reinterpret_cast<const char*>(x), 0, I * kB};
  s.c = {reinterpret_cast<const char*>(dw), int64_t(O) * I * int64_t(sizeof(T)), 0};
  s.d = s.c;                             // in place: dw_e = dy_e^T x_e + dw_e
  if constexpr (!C::kReadsC) s.c = {nullptr, 0, 0};
  s.sa = leading_stride<typename C::StrideA>(O);  // dy^T: O x rows, M contiguous (ld O)
  s.sb = leading_stride<typename C::StrideB>(I);  // x: rows x I = K x N, N contiguous
  s.sc = leading_stride<typename C::StrideC>(I);
  s.sd = leading_stride<typename C::StrideD>(I);
  s.fixed = Mnk{O, I, 0};
  s.vary_mode = 2;
  run<C>("wgrad", shapes_of(experts, offsets_host, s.fixed, 2), offsets_device, E, s, C::kReadsC ? 1.f : 0.f, stream);
}

}  // namespace

}  // namespace mop::cuda::detail
