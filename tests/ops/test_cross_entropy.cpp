#include "ops/cpu/cross_entropy.h"

#include "op_check.h"

using namespace mop::cpu;
using namespace opcheck;

namespace {

struct Case {
  int N, V;
  double logit_scale;
  int ignore_every;  // every k-th row gets target -100 (0: none)
};
const Case kCases[] = {{1, 5, 1.0, 0}, {7, 17, 3.0, 3}, {33, 64, 1.0, 4}, {5, 9, 60.0, 2}, {4, 3, 1.0, 1}};

void ref_forward(Vec& loss, Vec& lse, double& total, const Vec& logits, const std::vector<int32_t>& t, int N, int V) {
  loss.assign(N, 0), lse.assign(N, 0), total = 0;
  for (int n = 0; n < N; ++n) {
    if (t[n] < 0) continue;
    double m = logits[n * V];
    for (int v = 0; v < V; ++v) m = std::max(m, logits[n * V + v]);
    double z = 0;
    for (int v = 0; v < V; ++v) z += std::exp(logits[n * V + v] - m);
    lse[n] = m + std::log(z);
    loss[n] = lse[n] - logits[n * V + t[n]];
    total += loss[n];
  }
}

struct Problem {
  Vec logits;
  std::vector<int32_t> targets;
};
Problem make(const Case& c) {
  Rand r(c.N * 100 + c.V);
  Problem p{r.normals(size_t(c.N) * c.V, c.logit_scale), r.ints(c.N, c.V)};
  if (c.ignore_every)
    for (int n = 0; n < c.N; n += c.ignore_every) p.targets[n] = -100;
  return p;
}

}  // namespace

TEST(CrossEntropy, ForwardMatchesReference) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "N=" << c.N << " V=" << c.V << " scale=" << c.logit_scale);
    Problem p = make(c);
    Vec loss, lse;
    double total;
    ref_forward(loss, lse, total, p.logits, p.targets, c.N, c.V);
    auto run = [&]<class T>(T) {
      auto l = to<T>(p.logits);
      auto lo = nans<T>(c.N), ls = nans<T>(c.N);
      const double got = cross_entropy_forward<T>(lo.data(), ls.data(), l.data(), p.targets.data(), c.N, c.V);
      EXPECT_TRUE(close(lo, loss, c.V));
      EXPECT_TRUE(close(ls, lse, c.V));
      const double eps = std::numeric_limits<T>::epsilon();
      EXPECT_NEAR(got, total, 8 * eps * (std::abs(total) + 1) * std::sqrt(double(c.N) * c.V));
      for (int n = 0; n < c.N; ++n) {
        if (p.targets[n] < 0) {
          EXPECT_TRUE(lo[n] == 0 && ls[n] == 0) << "ignored row " << n;
        }
      }
    };
    run(double{});
    run(float{});
  }
}

TEST(CrossEntropy, BackwardMatchesFiniteDifferences) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "N=" << c.N << " V=" << c.V << " scale=" << c.logit_scale);
    Problem p = make(c);
    const double dscale = 0.37;
    Vec loss(c.N), lse(c.N), dl(p.logits.size(), NAN);
    cross_entropy_forward<double>(loss.data(), lse.data(), p.logits.data(), p.targets.data(), c.N, c.V);
    cross_entropy_backward<double>(dl.data(), p.logits.data(), lse.data(), p.targets.data(), dscale, c.N, c.V);
    EXPECT_TRUE(fd_check(p.logits, dl, [&] {
      Vec lo, ls;
      double total;
      ref_forward(lo, ls, total, p.logits, p.targets, c.N, c.V);
      return dscale * total;
    }));
    for (int n = 0; n < c.N; ++n) {
      if (p.targets[n] >= 0) continue;
      for (int v = 0; v < c.V; ++v) {
        ASSERT_EQ(dl[n * c.V + v], 0.0) << "ignored row " << n;
      }
    }

    auto lf = to<float>(p.logits);
    std::vector<float> lof(c.N), lsf(c.N);
    auto dlf = nans<float>(dl.size());
    cross_entropy_forward<float>(lof.data(), lsf.data(), lf.data(), p.targets.data(), c.N, c.V);
    cross_entropy_backward<float>(dlf.data(), lf.data(), lsf.data(), p.targets.data(), float(dscale), c.N, c.V);
    // exp(l - lse) with a rounded lse: relative error eps * |lse|, covered by K = V.
    EXPECT_TRUE(close(dlf, dl, c.V * (1 + c.logit_scale)));
  }
}

TEST(CrossEntropy, Deterministic) {
  const int N = 500, V = 300;
  Rand r(77);
  auto logits = to<float>(r.normals(size_t(N) * V, 4.0));
  auto t = r.ints(N, V);
  auto go = [&] {
    std::vector<float> loss(N), lse(N), dl(size_t(N) * V);
    double total = cross_entropy_forward<float>(loss.data(), lse.data(), logits.data(), t.data(), N, V);
    cross_entropy_backward<float>(dl.data(), logits.data(), lse.data(), t.data(), 1.f / N, N, V);
    dl.push_back(float(total));
    dl.insert(dl.end(), loss.begin(), loss.end());
    return dl;
  };
  auto a = go(), b = go();
  std::vector<float> s;
  with_threads(1, [&] { s = go(); });
  EXPECT_TRUE(same_bits(a, b));
  EXPECT_TRUE(same_bits(a, s));
}

TEST(CrossEntropy, TargetOutOfVocabularyThrows) {
  Vec logits(3 * 4), loss(3), lse(3), dl(12);
  std::vector<int32_t> t = {0, -100, 4};
  EXPECT_TRUE(throws_naming(
      [&] { cross_entropy_forward<double>(loss.data(), lse.data(), logits.data(), t.data(), 3, 4); },
      {"target 4", "row 2"}));
  EXPECT_TRUE(throws_naming(
      [&] { cross_entropy_backward<double>(dl.data(), logits.data(), lse.data(), t.data(), 1.0, 3, 4); },
      {"target 4", "row 2"}));
}
