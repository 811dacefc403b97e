#include "ops/cpu/attention.h"

#include "op_check.h"

using namespace mop::cpu;
using namespace opcheck;

namespace {

struct Case {
  std::vector<int> lens;  // document lengths, packed in order
  int H, KVH, hd;
};
const Case kCases[] = {
    {{1, 5, 11}, 4, 2, 8},   // several documents, GQA 2:1
    {{1, 5, 11}, 4, 1, 16},  // multi-query
    {{11, 1, 5}, 4, 4, 8},   // plain multi-head
    {{0, 7, 0, 3}, 2, 1, 5}, // empty documents
    {{9}, 1, 1, 16},
};

struct Problem {
  std::vector<int32_t> cu;
  int N = 0, n_docs = 0;
  std::vector<int> doc;  // document of each token, for the reference mask
  Vec q, k, v, R;
  double scale = 0;
};

Problem make(const Case& c, uint64_t seed) {
  Problem p;
  p.cu.push_back(0);
  for (int len : c.lens) {
    for (int i = 0; i < len; ++i) p.doc.push_back(p.n_docs);
    p.cu.push_back(p.cu.back() + len);
    ++p.n_docs;
  }
  p.N = p.cu.back();
  Rand r(seed);
  p.q = r.normals(size_t(p.N) * c.H * c.hd, 1.5);
  p.k = r.normals(size_t(p.N) * c.KVH * c.hd, 1.5);
  p.v = r.normals(size_t(p.N) * c.KVH * c.hd);
  p.R = r.normals(p.q.size());
  p.scale = 1 / std::sqrt(double(c.hd));
  return p;
}

// Straightforward masked softmax over all key positions.
void ref_forward(Vec& out, Vec& lse, const Problem& p, const Case& c) {
  out.assign(size_t(p.N) * c.H * c.hd, 0.0), lse.assign(size_t(p.N) * c.H, 0.0);
  for (int i = 0; i < p.N; ++i)
    for (int h = 0; h < c.H; ++h) {
      const int kh = h / (c.H / c.KVH);
      Vec s(p.N, -INFINITY);
      double m = -INFINITY;
      for (int j = 0; j < p.N; ++j) {
        if (p.doc[j] != p.doc[i] || j > i) continue;
        double d = 0;
        for (int x = 0; x < c.hd; ++x) d += p.q[(i * c.H + h) * c.hd + x] * p.k[(j * c.KVH + kh) * c.hd + x];
        s[j] = p.scale * d;
        m = std::max(m, s[j]);
      }
      double z = 0;
      for (int j = 0; j < p.N; ++j) z += std::exp(s[j] - m);
      for (int j = 0; j < p.N; ++j)
        for (int x = 0; x < c.hd; ++x)
          out[(i * c.H + h) * c.hd + x] += std::exp(s[j] - m) / z * p.v[(j * c.KVH + kh) * c.hd + x];
      lse[i * c.H + h] = m + std::log(z);
    }
}

template <class T> struct Result {
  std::vector<T> out, lse, dq, dk, dv;
};

template <class T> Result<T> run(const Problem& p, const Case& c) {
  auto q = to<T>(p.q), k = to<T>(p.k), v = to<T>(p.v), R = to<T>(p.R);
  Result<T> res{nans<T>(q.size()), nans<T>(size_t(p.N) * c.H), nans<T>(q.size()), nans<T>(k.size()),
                nans<T>(v.size())};
  attention_forward<T>(res.out.data(), res.lse.data(), q.data(), k.data(), v.data(), p.cu.data(), p.n_docs, p.N, c.H,
                       c.KVH, c.hd, T(p.scale));
  attention_backward<T>(res.dq.data(), res.dk.data(), res.dv.data(), R.data(), res.out.data(), res.lse.data(),
                        q.data(), k.data(), v.data(), p.cu.data(), p.n_docs, p.N, c.H, c.KVH, c.hd, T(p.scale));
  return res;
}

int max_len(const Case& c) { return c.lens.empty() ? 1 : std::max(1, *std::max_element(c.lens.begin(), c.lens.end())); }

}  // namespace

TEST(Attention, ForwardMatchesReference) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "docs=" << c.lens.size() << " H=" << c.H << " KVH=" << c.KVH
                                      << " hd=" << c.hd);
    Problem p = make(c, c.H * 100 + c.KVH * 10 + c.hd);
    Vec out, lse;
    ref_forward(out, lse, p, c);
    const double K = double(max_len(c)) * c.hd;
    auto d = run<double>(p, c);
    EXPECT_TRUE(close(d.out, out, K));
    EXPECT_TRUE(close(d.lse, lse, K));
    auto f = run<float>(p, c);
    EXPECT_TRUE(close(f.out, out, K));
    EXPECT_TRUE(close(f.lse, lse, K));
  }
}

TEST(Attention, BackwardMatchesFiniteDifferences) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "docs=" << c.lens.size() << " H=" << c.H << " KVH=" << c.KVH
                                      << " hd=" << c.hd);
    Problem p = make(c, c.H * 7 + c.KVH * 3 + c.hd);
    auto d = run<double>(p, c);
    auto loss = [&] {
      Vec out, lse;
      ref_forward(out, lse, p, c);
      return dot(out, p.R);
    };
    EXPECT_TRUE(fd_check(p.q, d.dq, loss)) << "dq";
    EXPECT_TRUE(fd_check(p.k, d.dk, loss)) << "dk";
    EXPECT_TRUE(fd_check(p.v, d.dv, loss)) << "dv";

    auto f = run<float>(p, c);
    const double K = double(max_len(c)) * c.hd * (c.H / c.KVH);
    EXPECT_TRUE(close(f.dq, to_double(d.dq), K));
    EXPECT_TRUE(close(f.dk, to_double(d.dk), K));
    EXPECT_TRUE(close(f.dv, to_double(d.dv), K));
  }
}

TEST(Attention, DeterministicAcrossRunsAndThreadCounts) {
  const Case c{{100, 37, 1, 150}, 4, 2, 16};
  Problem p = make(c, 99);
  auto a = run<float>(p, c), b = run<float>(p, c);
  Result<float> s;
  with_threads(1, [&] { s = run<float>(p, c); });
  for (const auto* x : {&b, &s}) {
    EXPECT_TRUE(same_bits(a.out, x->out));
    EXPECT_TRUE(same_bits(a.lse, x->lse));
    EXPECT_TRUE(same_bits(a.dq, x->dq));
    EXPECT_TRUE(same_bits(a.dk, x->dk));
    EXPECT_TRUE(same_bits(a.dv, x->dv));
  }
}

TEST(Attention, BadLayoutThrows) {
  Vec q(4 * 2 * 4), k(4 * 1 * 4), v(k.size()), out(q.size()), lse(8);
  std::vector<int32_t> cu = {0, 3};  // does not cover N = 4
  EXPECT_TRUE(throws_naming(
      [&] { attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), cu.data(), 1, 4, 2, 1, 4, 0.5); },
      {"cu_seqlens[1] = 3", "N = 4"}));
  cu = {0, 4};
  EXPECT_TRUE(throws_naming(
      [&] { attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), cu.data(), 1, 4, 3, 2, 4, 0.5); },
      {"H=3", "KVH=2"}));
}
