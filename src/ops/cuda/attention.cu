// Causal packed-document attention through cuDNN's fused SDPA graphs (cuDNN frontend graph API).
// See attention.h for the layout contract; this file holds the graph building, the graph cache and
// three small kernels (ragged metadata from cu_seqlens, row gather, lse transpose).
#include <cudnn.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>

// The frontend headers trip a few of our warnings (unreachable loops, ignored [[nodiscard]],
// unused static functions); they are not ours to fix.
#pragma nv_diag_suppress 128, 2810
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include <cudnn_frontend.h>
#pragma GCC diagnostic pop
#pragma nv_diag_default 128, 2810

#include "ops/cuda/attention.h"
#include "ops/cuda/check.cuh"
#include "ops/cuda/elementwise.h"

namespace mop::cuda {

namespace fe = cudnn_frontend;
namespace fg = cudnn_frontend::graph;

// ---- kernels --------------------------------------------------------------------------------

// Per document b < B: seq_len[b]; per b <= B: element offsets of document b's first token in each
// tensor (= cu_seqlens[b] * that tensor's token stride). Documents n_docs..B-1 are the padding
// that rounds the batch up to its bucket: length 0, offset at the end of the data.
template <class Off>
static __global__ void ragged_meta_kernel(const int32_t* cu, int n_docs, int B, int32_t* seq_len, Off* off_q,
                                          Off* off_kv, Off* off_o, Off* off_dkv, Off* off_st, int64_t q_rs,
                                          int64_t kv_rs, int64_t o_rs, int64_t dkv_rs, int64_t st_rs) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b > B) return;
  const int64_t c = cu[min(b, n_docs)];
  off_q[b] = Off(c * q_rs);
  off_kv[b] = Off(c * kv_rs);
  off_o[b] = Off(c * o_rs);
  off_dkv[b] = Off(c * dkv_rs);
  off_st[b] = Off(c * st_rs);
  if (b < B) seq_len[b] = b < n_docs ? int32_t(cu[b + 1] - c) : 0;
}

// Batched layout, backward: cuDNN < 9.26 reads a non-ragged Stats input only as packed (B, H, L),
// while lse_NH is token-major (B*L, H).
static __global__ void lse_to_bhl_kernel(const float* lse_NH, float* lse_bhl, int B, int H, int L) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(B) * H * L) return;
  const int64_t l = i % L, h = (i / L) % H, b = i / (int64_t(L) * H);
  lse_bhl[i] = lse_NH[(b * L + l) * H + h];
}

namespace {

// ---- graph cache ----------------------------------------------------------------------------

enum Uid : int64_t { Q = 1, K, V, O, STATS, DO, DQ, DK, DV, SEQ_Q, SEQ_KV, OFF_Q, OFF_KV, OFF_O, OFF_DKV, OFF_ST, SCALE };

struct Key {
  bool bwd, ragged, off64, det;
  int dev, B, S, Ntot, H, KVH, hd, qrs, kvrs;
  auto tie() const { return std::tie(bwd, ragged, off64, det, dev, B, S, Ntot, H, KVH, hd, qrs, kvrs); }
  bool operator==(const Key& o) const { return tie() == o.tie(); }
};
struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = size_t(k.bwd) | size_t(k.ragged) << 1 | size_t(k.off64) << 2 | size_t(k.det) << 3;
    for (int x : {k.dev, k.B, k.S, k.Ntot, k.H, k.KVH, k.hd, k.qrs, k.kvrs}) h = h * 1000003u ^ size_t(unsigned(x));
    return h;
  }
};

constexpr size_t kAlign = 256;
size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Workspace: [ragged metadata | lse (B, H, L) copy | contiguous q, k, v copies | cuDNN workspace],
// each part 256-byte aligned; the copies are sized per call (repack_bytes), the rest per graph.
struct Entry {
  std::shared_ptr<fg::Graph> graph;
  size_t meta_bytes = 0, lse_bytes = 0, cudnn_bytes = 0;
  size_t total() const { return meta_bytes + lse_bytes + cudnn_bytes; }
};

// Ragged metadata sizes: seq_len (B int32) then five offset arrays of B + 1 entries.
size_t offsets_bytes(const Key& k) { return align_up(size_t(k.B + 1) * (k.off64 ? 8 : 4)); }
size_t meta_bytes(const Key& k) { return k.ragged ? align_up(size_t(k.B) * 4) + 5 * offsets_bytes(k) : 0; }

struct State {
  std::mutex mu;
  std::unordered_map<int, cudnnHandle_t> handles;  // one per device, made on first use
  std::unordered_map<Key, std::unique_ptr<Entry>, KeyHash> cache;
  AttentionOptions options;
};
// Leaked on purpose: destroying cuDNN plans after the CUDA runtime has shut down at exit crashes.
State& state() {
  static State* s = new State;
  return *s;
}

std::string describe(const Key& k) {
  return fmt::format("{} {} B={} S={} H={} KVH={} hd={} q_row_stride={} kv_row_stride={}{}",
                     k.bwd ? "backward" : "forward", k.ragged ? "THD" : "BSHD", k.B, k.S, k.H, k.KVH, k.hd, k.qrs,
                     k.kvrs, k.det ? " deterministic" : "");
}

void fe_check(fe::error_t st, const char* step, const Key& k) {
  if (st.is_bad()) MOP_FAIL("cuDNN attention {} failed ({}): {}", step, describe(k), st.get_message());
}

std::unique_ptr<Entry> build(const Key& k, cudnnHandle_t handle) {
  auto g = std::make_shared<fg::Graph>();
  g->set_io_data_type(fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  const int64_t B = k.B, S = k.S, H = k.H, KH = k.KVH, D = k.hd;
  const auto off_type = k.off64 ? fe::DataType_t::INT64 : fe::DataType_t::INT32;
  auto index = [&](const char* name, int64_t uid, int64_t n, fe::DataType_t type) {
    return g->tensor(fg::Tensor_attributes().set_name(name).set_uid(uid).set_dim({n, 1, 1, 1})
                         .set_stride({1, 1, 1, 1}).set_data_type(type));
  };
  std::shared_ptr<fg::Tensor_attributes> seq_q, seq_kv, off_q, off_kv, off_o, off_dkv, off_st;
  if (k.ragged) {
    seq_q = index("seq_q", SEQ_Q, B, fe::DataType_t::INT32);
    seq_kv = index("seq_kv", SEQ_KV, B, fe::DataType_t::INT32);
    off_q = index("off_q", OFF_Q, B + 1, off_type);
    off_kv = index("off_kv", OFF_KV, B + 1, off_type);
    off_o = index("off_o", OFF_O, B + 1, off_type);
    off_st = index("off_st", OFF_ST, B + 1, off_type);
    if (k.bwd) off_dkv = index("off_dkv", OFF_DKV, B + 1, off_type);
  }
  // (B, heads, S, D) over token-major rows of row_stride elements; under a ragged offset the batch
  // stride is ignored and the offset locates each document.
  auto set_bshd = [&](fg::Tensor_attributes& t, int64_t uid, int64_t heads, int64_t row_stride,
                      const std::shared_ptr<fg::Tensor_attributes>& off) -> fg::Tensor_attributes& {
    t.set_uid(uid).set_data_type(fe::DataType_t::BFLOAT16).set_dim({B, heads, S, D})
        .set_stride({S * row_stride, D, row_stride, 1});
    if (off) t.set_ragged_offset(off);
    return t;
  };
  auto input = [&](const char* name, int64_t uid, int64_t heads, int64_t row_stride,
                   const std::shared_ptr<fg::Tensor_attributes>& off) {
    fg::Tensor_attributes t;
    t.set_name(name);
    return g->tensor(set_bshd(t, uid, heads, row_stride, off));
  };
  // Stats (B, H, S, 1) fp32. Token-major (= lse_NH) when ragged (offset cu * H) and for the forward
  // store; packed BHSD for the batched backward read (see lse_to_bhl_kernel).
  auto set_stats = [&](fg::Tensor_attributes& t) {
    t.set_uid(STATS).set_data_type(fe::DataType_t::FLOAT).set_dim({B, H, S, 1});
    if (k.ragged || !k.bwd)
      t.set_stride({S * H, 1, H, 1});
    else
      t.set_stride({H * S, S, 1, 1});
    if (off_st) t.set_ragged_offset(off_st);
  };
  auto scale = g->tensor(fg::Tensor_attributes().set_name("attn_scale").set_uid(SCALE).set_dim({1, 1, 1, 1})
                             .set_stride({1, 1, 1, 1}).set_is_pass_by_value(true)
                             .set_data_type(fe::DataType_t::FLOAT));
  auto q = input("Q", Q, H, k.qrs, off_q);
  auto kk = input("K", K, KH, k.kvrs, off_kv);
  auto v = input("V", V, KH, k.kvrs, off_kv);

  if (!k.bwd) {
    auto opts = fg::SDPA_attributes()
                    .set_name("attention_fwd")
                    .set_generate_stats(true)
                    .set_attn_scale(scale)
                    .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                    .set_diagonal_band_right_bound(0);
    if (k.ragged) opts.set_padding_mask(true).set_seq_len_q(seq_q).set_seq_len_kv(seq_kv);
    auto [o, stats] = g->sdpa(q, kk, v, opts);
    set_bshd(o->set_output(true), O, H, H * D, off_o);
    stats->set_output(true);
    set_stats(*stats);
  } else {
    auto o = input("O", O, H, H * D, off_o);
    auto dout = input("dO", DO, H, H * D, off_o);
    fg::Tensor_attributes st;
    st.set_name("Stats");
    set_stats(st);
    auto stats = g->tensor(st);
    auto opts = fg::SDPA_backward_attributes()
                    .set_name("attention_bwd")
                    .set_attn_scale(scale)
                    .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                    .set_diagonal_band_right_bound(0)
                    .set_deterministic_algorithm(k.det);
    // max_total_seq_len sizes cuDNN's fp32 dQ accumulator (and the GQA dK/dV full-head buffers)
    // by the packed token count instead of B * S_max.
    if (k.ragged)
      opts.set_padding_mask(true).set_seq_len_q(seq_q).set_seq_len_kv(seq_kv).set_max_total_seq_len_q(k.Ntot)
          .set_max_total_seq_len_kv(k.Ntot);
    auto [dq, dk, dv] = g->sdpa_backward(q, kk, v, o, dout, stats, opts);
    set_bshd(dq->set_output(true), DQ, H, H * D, off_o);
    set_bshd(dk->set_output(true), DK, KH, KH * D, off_dkv);
    set_bshd(dv->set_output(true), DV, KH, KH * D, off_dkv);
  }

  fe_check(g->validate(), "validate", k);
  fe_check(g->build_operation_graph(handle), "build_operation_graph", k);
  fe_check(g->create_execution_plans({fe::HeurMode_t::A}), "create_execution_plans", k);
  fe_check(g->check_support(), "check_support", k);
  fe_check(g->build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE), "build_plans", k);
  int64_t ws = 0;
  fe_check(g->get_workspace_size(ws), "get_workspace_size", k);

  auto e = std::make_unique<Entry>();
  e->graph = std::move(g);
  e->meta_bytes = meta_bytes(k);
  e->lse_bytes = (k.bwd && !k.ragged) ? align_up(size_t(B) * H * S * sizeof(float)) : 0;
  e->cudnn_bytes = align_up(size_t(ws));
  return e;
}

// Caller holds state().mu.
cudnnHandle_t handle_for(int dev) {
  cudnnHandle_t& h = state().handles[dev];
  if (!h) {
    const cudnnStatus_t st = cudnnCreate(&h);
    MOP_CHECK(st == CUDNN_STATUS_SUCCESS, "cudnnCreate failed: {}", cudnnGetErrorString(st));
  }
  return h;
}
Entry& get_entry(const Key& k) {
  State& s = state();
  auto it = s.cache.find(k);
  if (it == s.cache.end()) it = s.cache.emplace(k, build(k, handle_for(k.dev))).first;
  return *it->second;
}

// ---- shapes ---------------------------------------------------------------------------------

int pow2_at_least(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}
// Packed token count bucket (only sizes workspaces): 1024, powers of two to 32K, then 32K steps.
int tokens_bucket(int n) {
  if (n <= 1024) return 1024;
  if (n <= 32768) return pow2_at_least(n);
  return int((int64_t(n) + 32767) / 32768 * 32768);
}

Key make_key(bool bwd, int n_docs, int max_doc_len, int N, int H, int KVH, int hd, int qrs, int kvrs,
             const AttentionOptions& opt) {
  Key k{};
  k.bwd = bwd;
  MOP_CUDA_CHECK(cudaGetDevice(&k.dev));
  k.H = H, k.KVH = KVH, k.hd = hd, k.qrs = qrs, k.kvrs = kvrs;
  k.det = bwd && opt.deterministic_backward;
  // n_docs * max_doc_len == N with every length <= max_doc_len means all documents have that
  // length: the plain batched layout, no padding mask. (L = 1 goes ragged: cuDNN's backward
  // rejects s_q = s_kv = 1.)
  k.ragged = opt.force_ragged || max_doc_len <= 1 || int64_t(n_docs) * max_doc_len != N;
  if (!k.ragged) {
    k.B = n_docs, k.S = max_doc_len;
  } else {
    k.B = pow2_at_least(n_docs), k.S = std::max(64, pow2_at_least(max_doc_len));
    const int ntot = tokens_bucket(N);
    k.Ntot = bwd ? ntot : 0;
    // cuDNN's THD backward gave wrong gradients (cuDNN 9.14, H200) when q/k/v are strided views
    // (row stride != heads * hd) while dq/dk/dv are contiguous, although the THD forward and the
    // strided BSHD backward are right: such inputs are copied to contiguous rows first.
    if (bwd) k.qrs = H * hd, k.kvrs = KVH * hd;
    const int64_t widest = std::max<int64_t>({k.qrs, k.kvrs, int64_t(H) * hd});
    k.off64 = int64_t(ntot) * widest > int64_t(INT32_MAX);
  }
  return k;
}

void check_shape(const char* what, const int32_t* cu_host, int n_docs, int max_doc_len, int N, int H, int KVH,
                 int hd, int qrs, int kvrs) {
  MOP_CHECK(n_docs >= 0 && N >= 0 && max_doc_len >= 1, "{}: bad sizes n_docs={} N={} max_doc_len={}", what, n_docs,
            N, max_doc_len);
  MOP_CHECK(H > 0 && KVH > 0 && H % KVH == 0, "{}: H={} is not a multiple of KVH={}", what, H, KVH);
  MOP_CHECK(hd > 0 && hd % 8 == 0 && hd <= 256, "{}: head dim {} must be a multiple of 8 and at most 256", what, hd);
  MOP_CHECK(qrs >= H * hd && qrs % 8 == 0, "{}: q_row_stride {} must be >= H*hd = {} and a multiple of 8", what, qrs,
            H * hd);
  MOP_CHECK(kvrs >= KVH * hd && kvrs % 8 == 0, "{}: kv_row_stride {} must be >= KVH*hd = {} and a multiple of 8",
            what, kvrs, KVH * hd);
  MOP_CHECK(cu_host != nullptr && cu_host[0] == 0, "{}: cu_seqlens[0] must be 0", what);
  for (int b = 0; b < n_docs; ++b) {
    const int len = cu_host[b + 1] - cu_host[b];
    MOP_CHECK(len >= 0 && len <= max_doc_len, "{}: document {} has length {} (max_doc_len {})", what, b, len,
              max_doc_len);
  }
  MOP_CHECK(cu_host[n_docs] == N, "{}: cu_seqlens[{}] = {}, expected N = {}", what, n_docs, cu_host[n_docs], N);
}

// Bytes of the contiguous q, k, v copies the THD backward makes of strided inputs (0 if none).
size_t repack_bytes(const Key& k, int N, int qrs, int kvrs) {
  if (!k.bwd || !k.ragged || (qrs == k.qrs && kvrs == k.kvrs)) return 0;
  return align_up(size_t(N) * k.qrs * 2) + 2 * align_up(size_t(N) * k.kvrs * 2);
}

void check_aligned(const char* what, std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    MOP_CHECK(p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 == 0, "{}: pointer {} is not 16-byte aligned",
              what, p);
}

// Binds the stream, writes the ragged metadata into the workspace and adds it to the variant pack.
void launch_meta(const Key& k, const Entry& e, const int32_t* cu_dev, int n_docs, char* ws,
                 std::unordered_map<int64_t, void*>& pack, cudnnHandle_t handle, cudaStream_t stream) {
  const cudnnStatus_t st = cudnnSetStream(handle, stream);
  MOP_CHECK(st == CUDNN_STATUS_SUCCESS, "cudnnSetStream failed: {}", cudnnGetErrorString(st));
  if (!k.ragged) return;
  auto* seq = reinterpret_cast<int32_t*>(ws);
  char* off = ws + align_up(size_t(k.B) * 4);
  const size_t ob = offsets_bytes(k);
  void *oq = off, *okv = off + ob, *oo = off + 2 * ob, *odkv = off + 3 * ob, *ost = off + 4 * ob;
  const int threads = 128, blocks = (k.B + 1 + threads - 1) / threads;
  const int64_t hd = k.hd;
  if (k.off64)
    ragged_meta_kernel<int64_t><<<blocks, threads, 0, stream>>>(
        cu_dev, n_docs, k.B, seq, (int64_t*)oq, (int64_t*)okv, (int64_t*)oo, (int64_t*)odkv, (int64_t*)ost, k.qrs,
        k.kvrs, k.H * hd, k.KVH * hd, k.H);
  else
    ragged_meta_kernel<int32_t><<<blocks, threads, 0, stream>>>(
        cu_dev, n_docs, k.B, seq, (int32_t*)oq, (int32_t*)okv, (int32_t*)oo, (int32_t*)odkv, (int32_t*)ost, k.qrs,
        k.kvrs, k.H * hd, k.KVH * hd, k.H);
  MOP_CUDA_LAUNCH_CHECK();
  pack[SEQ_Q] = seq;
  pack[SEQ_KV] = seq;
  pack[OFF_Q] = oq;
  pack[OFF_KV] = okv;
  pack[OFF_O] = oo;
  pack[OFF_ST] = ost;
  if (k.bwd) pack[OFF_DKV] = odkv;
}

void execute(const Key& k, const Entry& e, std::unordered_map<int64_t, void*>& pack, void* cudnn_ws,
             cudnnHandle_t handle) {
  fe_check(e.graph->execute(handle, pack, cudnn_ws), "execute", k);
}

void* mut(const void* p) { return const_cast<void*>(p); }

}  // namespace

void set_attention_options(const AttentionOptions& options) {
  std::lock_guard<std::mutex> lock(state().mu);
  state().options = options;
}
AttentionOptions attention_options() {
  std::lock_guard<std::mutex> lock(state().mu);
  return state().options;
}

size_t attention_workspace_bytes(int n_docs, int max_doc_len, int N, int H, int KVH, int hd, int q_row_stride,
                                 int kv_row_stride) {
  if (N == 0) return 0;
  std::lock_guard<std::mutex> lock(state().mu);
  const AttentionOptions opt = state().options;
  size_t bytes = 0;
  for (bool bwd : {false, true}) {
    const Key k = make_key(bwd, n_docs, max_doc_len, N, H, KVH, hd, q_row_stride, kv_row_stride, opt);
    bytes = std::max(bytes, get_entry(k).total() + repack_bytes(k, N, q_row_stride, kv_row_stride));
  }
  return bytes;
}

void attention_forward(__nv_bfloat16* out_NHd, float* lse_NH, const __nv_bfloat16* q, const __nv_bfloat16* k,
                       const __nv_bfloat16* v, const int32_t* cu_seqlens_device, const int32_t* cu_seqlens_host,
                       int n_docs, int max_doc_len, int N, int H, int KVH, int hd, float scale, int q_row_stride,
                       int kv_row_stride, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  check_shape("attention_forward", cu_seqlens_host, n_docs, max_doc_len, N, H, KVH, hd, q_row_stride,
              kv_row_stride);
  if (N == 0) return;
  check_aligned("attention_forward", {out_NHd, lse_NH, q, k, v});
  std::lock_guard<std::mutex> lock(state().mu);
  State& s = state();
  const Key key = make_key(false, n_docs, max_doc_len, N, H, KVH, hd, q_row_stride, kv_row_stride, s.options);
  const Entry& e = get_entry(key);
  MOP_CHECK(workspace_bytes >= e.total() && (e.total() == 0 || workspace != nullptr),
            "attention_forward: workspace of {} bytes, needs {}", workspace_bytes, e.total());
  char* ws = static_cast<char*>(workspace);
  float scale_value = scale;  // pass-by-value: read on the host during execute
  std::unordered_map<int64_t, void*> pack = {{Q, mut(q)},           {K, mut(k)},        {V, mut(v)},
                                             {O, out_NHd},          {STATS, lse_NH},    {SCALE, &scale_value}};
  const cudnnHandle_t handle = handle_for(key.dev);
  launch_meta(key, e, cu_seqlens_device, n_docs, ws, pack, handle, stream);
  execute(key, e, pack, ws + e.meta_bytes + e.lse_bytes, handle);
}

void attention_backward(__nv_bfloat16* dq, __nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout,
                        const __nv_bfloat16* out, const float* lse_NH, const __nv_bfloat16* q,
                        const __nv_bfloat16* k, const __nv_bfloat16* v, const int32_t* cu_seqlens_device,
                        const int32_t* cu_seqlens_host, int n_docs, int max_doc_len, int N, int H, int KVH, int hd,
                        float scale, int q_row_stride, int kv_row_stride, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream) {
  check_shape("attention_backward", cu_seqlens_host, n_docs, max_doc_len, N, H, KVH, hd, q_row_stride,
              kv_row_stride);
  if (N == 0) return;
  check_aligned("attention_backward", {dq, dk, dv, dout, out, lse_NH, q, k, v});
  std::lock_guard<std::mutex> lock(state().mu);
  State& s = state();
  const Key key = make_key(true, n_docs, max_doc_len, N, H, KVH, hd, q_row_stride, kv_row_stride, s.options);
  const Entry& e = get_entry(key);
  const size_t repack = repack_bytes(key, N, q_row_stride, kv_row_stride), need = e.total() + repack;
  MOP_CHECK(workspace_bytes >= need && (need == 0 || workspace != nullptr),
            "attention_backward: workspace of {} bytes, needs {}", workspace_bytes, need);
  char* ws = static_cast<char*>(workspace);
  float scale_value = scale;
  std::unordered_map<int64_t, void*> pack = {
      {Q, mut(q)}, {K, mut(k)},      {V, mut(v)}, {O, mut(out)},         {DO, mut(dout)},
      {DQ, dq},    {DK, dk},         {DV, dv},    {STATS, mut(lse_NH)},  {SCALE, &scale_value}};
  const cudnnHandle_t handle = handle_for(key.dev);
  launch_meta(key, e, cu_seqlens_device, n_docs, ws, pack, handle, stream);
  if (!key.ragged) {
    float* lse_bhl = reinterpret_cast<float*>(ws + e.meta_bytes);
    const int64_t n = int64_t(N) * H;
    lse_to_bhl_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(lse_NH, lse_bhl, key.B, H, key.S);
    MOP_CUDA_LAUNCH_CHECK();
    pack[STATS] = lse_bhl;
  }
  char* copies = ws + e.meta_bytes + e.lse_bytes;
  if (repack) {
    auto* qc = reinterpret_cast<__nv_bfloat16*>(copies);
    auto* kc = reinterpret_cast<__nv_bfloat16*>(copies + align_up(size_t(N) * key.qrs * 2));
    auto* vc = reinterpret_cast<__nv_bfloat16*>(reinterpret_cast<char*>(kc) + align_up(size_t(N) * key.kvrs * 2));
    copy_rows_bf16(qc, size_t(key.qrs), q, size_t(q_row_stride), size_t(N), size_t(key.qrs), stream);
    copy_rows_bf16(kc, size_t(key.kvrs), k, size_t(kv_row_stride), size_t(N), size_t(key.kvrs), stream);
    copy_rows_bf16(vc, size_t(key.kvrs), v, size_t(kv_row_stride), size_t(N), size_t(key.kvrs), stream);
    pack[Q] = qc, pack[K] = kc, pack[V] = vc;
  }
  execute(key, e, pack, copies + repack, handle);
}

}  // namespace mop::cuda
