#include "ops/cpu/moe_permute.h"

#include "op_check.h"

using namespace mop::cpu;
using namespace opcheck;

namespace {

struct Case {
  const char* name;
  int N, E, K;
  std::vector<int32_t> idx;  // empty: random distinct experts per token
};

std::vector<int32_t> routing(const Case& c, Rand& r) {
  if (!c.idx.empty() || c.N == 0) return c.idx;
  std::vector<int32_t> idx;
  for (int n = 0; n < c.N; ++n) {
    std::vector<int32_t> perm(c.E);
    for (int e = 0; e < c.E; ++e) perm[e] = e;
    for (int e = c.E - 1; e > 0; --e) std::swap(perm[e], perm[r.below(e + 1)]);
    idx.insert(idx.end(), perm.begin(), perm.begin() + c.K);
  }
  return idx;
}

std::vector<int32_t> repeat(std::vector<int32_t> pattern, int times) {
  std::vector<int32_t> v;
  for (int t = 0; t < times; ++t) v.insert(v.end(), pattern.begin(), pattern.end());
  return v;
}

const Case kCases[] = {
    {"random", 33, 8, 2, {}},
    {"all to one expert", 7, 4, 1, repeat({2}, 7)},
    {"two experts empty", 9, 4, 2, repeat({3, 1}, 9)},
    {"K == E", 5, 3, 3, {}},
    {"one token", 1, 6, 2, {}},
    {"empty", 0, 4, 2, {}},
};

// Reference layout: for each expert in turn, its assignments in (token, slot) order.
void ref_layout(std::vector<int32_t>& row, std::vector<int32_t>& off, const std::vector<int32_t>& idx, int E) {
  row.assign(idx.size(), -1), off.assign(E + 1, 0);
  int next = 0;
  for (int e = 0; e < E; ++e) {
    off[e] = next;
    for (size_t a = 0; a < idx.size(); ++a)
      if (idx[a] == e) row[a] = next++;
  }
  off[E] = next;
}

Vec ref_permute(const Vec& x, const std::vector<int32_t>& row, int N, int K, int D) {
  Vec xp(size_t(N) * K * D);
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k)
      for (int d = 0; d < D; ++d) xp[row[n * K + k] * D + d] = x[n * D + d];
  return xp;
}

Vec ref_combine(const Vec& yp, const Vec& w, const std::vector<int32_t>& row, int N, int K, int D) {
  Vec y(size_t(N) * D, 0.0);
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k)
      for (int d = 0; d < D; ++d) y[n * D + d] += w[n * K + k] * yp[row[n * K + k] * D + d];
  return y;
}

}  // namespace

TEST(MoePermute, LayoutIsStableCountingSort) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.name);
    Rand r(c.N + c.E);
    auto idx = routing(c, r);
    std::vector<int32_t> row(idx.size(), -7), off(c.E + 1, -7), rrow, roff;
    moe_route_layout(row.data(), off.data(), idx.data(), c.N, c.E, c.K);
    ref_layout(rrow, roff, idx, c.E);
    EXPECT_EQ(row, rrow);
    EXPECT_EQ(off, roff);
  }
}

TEST(MoePermute, ForwardsMatchReference) {
  const int D = 17;
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.name);
    Rand r(c.N * 3 + c.E);
    auto idx = routing(c, r);
    const int M = c.N * c.K;
    std::vector<int32_t> row(M), off(c.E + 1);
    moe_route_layout(row.data(), off.data(), idx.data(), c.N, c.E, c.K);
    Vec x = r.normals(size_t(c.N) * D), yp = r.normals(size_t(M) * D), w = r.normals(size_t(M));
    Vec xp_ref = ref_permute(x, row, c.N, c.K, D), y_ref = ref_combine(yp, w, row, c.N, c.K, D);
    auto run = [&]<class T>(T) {
      auto xt = to<T>(x), ypt = to<T>(yp), wt = to<T>(w);
      auto xp = nans<T>(xp_ref.size()), y = nans<T>(y_ref.size());
      moe_permute<T>(xp.data(), xt.data(), row.data(), c.N, c.K, D);
      moe_combine<T>(y.data(), ypt.data(), wt.data(), row.data(), c.N, c.K, D);
      EXPECT_TRUE(close(xp, xp_ref, 1, 0));  // a copy: exact
      EXPECT_TRUE(close(y, y_ref, c.K));
    };
    run(double{});
    run(float{});
  }
}

TEST(MoePermute, BackwardsMatchFiniteDifferences) {
  const int D = 5;
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.name);
    Rand r(c.N * 11 + c.E);
    auto idx = routing(c, r);
    const int M = c.N * c.K;
    std::vector<int32_t> row(M), off(c.E + 1);
    moe_route_layout(row.data(), off.data(), idx.data(), c.N, c.E, c.K);
    Vec x = r.normals(size_t(c.N) * D), yp = r.normals(size_t(M) * D), w = r.normals(size_t(M));
    Vec Rxp = r.normals(size_t(M) * D), Ry = r.normals(size_t(c.N) * D);

    Vec dx(x.size(), NAN);
    moe_permute_backward<double>(dx.data(), Rxp.data(), row.data(), c.N, c.K, D);
    EXPECT_TRUE(fd_check(x, dx, [&] { return dot(ref_permute(x, row, c.N, c.K, D), Rxp); })) << "permute dx";

    Vec dyp(yp.size(), NAN), dw(w.size(), NAN);
    moe_combine_backward<double>(dyp.data(), dw.data(), Ry.data(), yp.data(), w.data(), row.data(), c.N, c.K, D);
    auto loss = [&] { return dot(ref_combine(yp, w, row, c.N, c.K, D), Ry); };
    EXPECT_TRUE(fd_check(yp, dyp, loss)) << "combine dyp";
    EXPECT_TRUE(fd_check(w, dw, loss)) << "combine dw";

    auto Rxpf = to<float>(Rxp), Ryf = to<float>(Ry), ypf = to<float>(yp), wf = to<float>(w);
    auto dxf = nans<float>(dx.size()), dypf = nans<float>(dyp.size()), dwf = nans<float>(dw.size());
    moe_permute_backward<float>(dxf.data(), Rxpf.data(), row.data(), c.N, c.K, D);
    moe_combine_backward<float>(dypf.data(), dwf.data(), Ryf.data(), ypf.data(), wf.data(), row.data(), c.N, c.K, D);
    EXPECT_TRUE(close(dxf, dx, c.K));
    EXPECT_TRUE(close(dypf, dyp, 1));
    EXPECT_TRUE(close(dwf, dw, D));
  }
}

TEST(MoePermute, BadExpertIdThrowsNamingIt) {
  std::vector<int32_t> idx = {0, 1, 2, 4}, row(4), off(5);
  EXPECT_TRUE(throws_naming([&] { moe_route_layout(row.data(), off.data(), idx.data(), 2, 4, 2); },
                            {"expert id 4", "token 1"}));
  idx = {-1, 0};
  EXPECT_TRUE(throws_naming([&] { moe_route_layout(row.data(), off.data(), idx.data(), 2, 4, 1); },
                            {"expert id -1", "token 0"}));
}
