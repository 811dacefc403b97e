#include "ops/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "core/error.h"

namespace mop::cpu {

namespace {
void check_layout(const int32_t* cu_seqlens, int n_docs, int N, int H, int KVH, int hd) {
  MOP_CHECK(n_docs >= 0 && N >= 0 && hd >= 0, "attention: bad sizes n_docs={} N={} hd={}", n_docs, N, hd);
  MOP_CHECK(KVH > 0 && H > 0 && H % KVH == 0, "attention: H={} is not a multiple of KVH={}", H, KVH);
  MOP_CHECK(cu_seqlens[0] == 0, "attention: cu_seqlens[0] = {}, expected 0", cu_seqlens[0]);
  for (int b = 0; b < n_docs; ++b)
    MOP_CHECK(cu_seqlens[b + 1] >= cu_seqlens[b], "attention: cu_seqlens decreases at document {} ({} > {})", b,
              cu_seqlens[b], cu_seqlens[b + 1]);
  MOP_CHECK(cu_seqlens[n_docs] == N, "attention: cu_seqlens[{}] = {}, expected N = {}", n_docs, cu_seqlens[n_docs], N);
}

template <class T> double dot(const T* a, const T* b, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += double(a[i]) * b[i];
  return s;
}
}  // namespace

template <class T>
void attention_forward(T* out_NHd, T* lse_NH, const T* q_NHd, const T* k_NKd, const T* v_NKd, const int32_t* cu_seqlens,
                       int n_docs, int N, int H, int KVH, int hd, T scale) {
  check_layout(cu_seqlens, n_docs, N, H, KVH, hd);
  const int group = H / KVH;
  std::vector<int32_t> doc_start(N);
  int max_len = 0;
  for (int b = 0; b < n_docs; ++b) {
    for (int i = cu_seqlens[b]; i < cu_seqlens[b + 1]; ++i) doc_start[i] = cu_seqlens[b];
    max_len = std::max(max_len, cu_seqlens[b + 1] - cu_seqlens[b]);
  }
  // Every (query, head) is independent: any schedule gives the same bits.
#pragma omp parallel
  {
    std::vector<double> s(max_len), acc(hd);
#pragma omp for schedule(static)
    for (long ih = 0; ih < long(N) * H; ++ih) {
      const int i = int(ih / H), h = int(ih % H), kh = h / group, j0 = doc_start[i];
      const T* q = q_NHd + size_t(ih) * hd;
      double m = -INFINITY;
      for (int j = j0; j <= i; ++j) {
        s[j - j0] = double(scale) * dot(q, k_NKd + (size_t(j) * KVH + kh) * hd, hd);
        m = std::max(m, s[j - j0]);
      }
      double sum = 0;
      for (int j = j0; j <= i; ++j) sum += (s[j - j0] = std::exp(s[j - j0] - m));
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int j = j0; j <= i; ++j) {
        const T* v = v_NKd + (size_t(j) * KVH + kh) * hd;
        const double p = s[j - j0] / sum;
        for (int d = 0; d < hd; ++d) acc[d] += p * v[d];
      }
      T* out = out_NHd + size_t(ih) * hd;
      for (int d = 0; d < hd; ++d) out[d] = T(acc[d]);
      lse_NH[ih] = T(m + std::log(sum));
    }
  }
}

// With p_ij = exp(scale q_i.k_j - lse_i) and D_i = dout_i . out_i (= sum_j p_ij dout_i.v_j):
// ds_ij = p_ij (dout_i.v_j - D_i), dq_i = scale sum_j ds_ij k_j, dk_j = scale sum_i ds_ij q_i,
// dv_j = sum_i p_ij dout_i, where dk/dv also sum over the query heads sharing the kv head.
template <class T>
void attention_backward(T* dq_NHd, T* dk_NKd, T* dv_NKd, const T* dout_NHd, const T* out_NHd, const T* lse_NH,
                        const T* q_NHd, const T* k_NKd, const T* v_NKd, const int32_t* cu_seqlens, int n_docs, int N,
                        int H, int KVH, int hd, T scale) {
  check_layout(cu_seqlens, n_docs, N, H, KVH, hd);
  const int group = H / KVH;
  int max_len = 0;
  for (int b = 0; b < n_docs; ++b) max_len = std::max(max_len, cu_seqlens[b + 1] - cu_seqlens[b]);
  // A (document, kv head) pair owns its dk/dv rows and the dq rows of its query heads, so
  // each work item runs start to end on one thread in a fixed order: dynamic scheduling
  // (for uneven documents) still gives bit-identical results.
#pragma omp parallel
  {
    std::vector<double> dk(size_t(max_len) * hd), dv(size_t(max_len) * hd), dq(hd);
#pragma omp for schedule(dynamic, 1)
    for (long item = 0; item < long(n_docs) * KVH; ++item) {
      const int b = int(item / KVH), kh = int(item % KVH);
      const int j0 = cu_seqlens[b], len = cu_seqlens[b + 1] - j0;
      std::fill_n(dk.begin(), size_t(len) * hd, 0.0);
      std::fill_n(dv.begin(), size_t(len) * hd, 0.0);
      for (int h = kh * group; h < (kh + 1) * group; ++h) {
        for (int i = j0; i < j0 + len; ++i) {
          const size_t ih = size_t(i) * H + h;
          const T* q = q_NHd + ih * hd;
          const T* dout = dout_NHd + ih * hd;
          const double Di = dot(dout, out_NHd + ih * hd, hd), lse = lse_NH[ih];
          std::fill(dq.begin(), dq.end(), 0.0);
          for (int j = j0; j <= i; ++j) {
            const T* k = k_NKd + (size_t(j) * KVH + kh) * hd;
            const T* v = v_NKd + (size_t(j) * KVH + kh) * hd;
            const double p = std::exp(double(scale) * dot(q, k, hd) - lse);
            const double ds = p * (dot(dout, v, hd) - Di);
            double* dkj = dk.data() + size_t(j - j0) * hd;
            double* dvj = dv.data() + size_t(j - j0) * hd;
            for (int d = 0; d < hd; ++d) {
              dq[d] += ds * k[d];
              dkj[d] += ds * q[d];
              dvj[d] += p * dout[d];
            }
          }
          T* dqi = dq_NHd + ih * hd;
          for (int d = 0; d < hd; ++d) dqi[d] = T(double(scale) * dq[d]);
        }
      }
      for (int j = j0; j < j0 + len; ++j) {
        T* dkj = dk_NKd + (size_t(j) * KVH + kh) * hd;
        T* dvj = dv_NKd + (size_t(j) * KVH + kh) * hd;
        for (int d = 0; d < hd; ++d) {
          dkj[d] = T(double(scale) * dk[size_t(j - j0) * hd + d]);
          dvj[d] = T(dv[size_t(j - j0) * hd + d]);
        }
      }
    }
  }
}

template void attention_forward<float>(float*, float*, const float*, const float*, const float*, const int32_t*, int,
                                       int, int, int, int, float);
template void attention_forward<double>(double*, double*, const double*, const double*, const double*,
                                        const int32_t*, int, int, int, int, int, double);
template void attention_backward<float>(float*, float*, float*, const float*, const float*, const float*, const float*,
                                        const float*, const float*, const int32_t*, int, int, int, int, int, float);
template void attention_backward<double>(double*, double*, double*, const double*, const double*, const double*,
                                         const double*, const double*, const double*, const int32_t*, int, int, int,
                                         int, int, double);

}  // namespace mop::cpu
