#include "ops/cpu/embedding.h"

#include "op_check.h"

using namespace mop::cpu;
using namespace opcheck;

namespace {

struct Case {
  int N, D, V;
};
const Case kCases[] = {{1, 5, 3}, {7, 17, 4}, {33, 64, 50}, {0, 5, 3}};

Vec ref_forward(const std::vector<int32_t>& tok, const Vec& wte, int N, int D) {
  Vec out(size_t(N) * D);
  for (int n = 0; n < N; ++n)
    for (int d = 0; d < D; ++d) out[size_t(n) * D + d] = wte[size_t(tok[n]) * D + d];
  return out;
}

template <class T> void check_forward(const Case& c) {
  Rand r(c.N * 131 + c.D);
  auto tok = r.ints(c.N, c.V);
  Vec wte = r.normals(size_t(c.V) * c.D);
  auto out = nans<T>(size_t(c.N) * c.D);
  auto wt = to<T>(wte);
  embedding_forward<T>(out.data(), tok.data(), wt.data(), c.N, c.D, c.V);
  EXPECT_TRUE(close(out, ref_forward(tok, wte, c.N, c.D), 1, 0));  // a copy: exact
}

}  // namespace

TEST(Embedding, ForwardMatchesReference) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "N=" << c.N << " D=" << c.D << " V=" << c.V);
    check_forward<double>(c);
    check_forward<float>(c);
  }
}

TEST(Embedding, BackwardAccumulatesAndMatchesFiniteDifferences) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "N=" << c.N << " D=" << c.D << " V=" << c.V);
    Rand r(c.N * 7 + c.V);
    auto tok = r.ints(c.N, c.V);  // small V: repeated tokens
    Vec wte = r.normals(size_t(c.V) * c.D), R = r.normals(size_t(c.N) * c.D), g0 = r.normals(wte.size());
    Vec dwte = g0;  // accumulated onto existing gradient
    embedding_backward<double>(dwte.data(), R.data(), tok.data(), c.N, c.D, c.V);
    auto loss = [&] { return dot(ref_forward(tok, wte, c.N, c.D), R); };
    EXPECT_TRUE(fd_check(wte, sub(dwte, g0), loss));
    auto dwf = to<float>(g0);
    auto Rf = to<float>(R);
    embedding_backward<float>(dwf.data(), Rf.data(), tok.data(), c.N, c.D, c.V);
    EXPECT_TRUE(close(dwf, dwte, c.N));
  }
}

TEST(Embedding, BackwardDeterministicAcrossRunsAndThreadCounts) {
  const int N = 3000, D = 150, V = 7;
  Rand r(3);
  auto tok = r.ints(N, V);
  auto dout = to<float>(r.normals(size_t(N) * D));
  std::vector<float> a(size_t(V) * D, 0.f), b = a, c = a;
  embedding_backward<float>(a.data(), dout.data(), tok.data(), N, D, V);
  embedding_backward<float>(b.data(), dout.data(), tok.data(), N, D, V);
  with_threads(1, [&] { embedding_backward<float>(c.data(), dout.data(), tok.data(), N, D, V); });
  EXPECT_TRUE(same_bits(a, b));
  EXPECT_TRUE(same_bits(a, c));
}

TEST(Embedding, BadTokenIdThrowsNamingIt) {
  const int D = 4, V = 10;
  std::vector<double> wte(size_t(V) * D, 1.0), out(3 * D), dwte(wte.size(), 0.0);
  std::vector<int32_t> tok = {1, 10, 2};
  EXPECT_TRUE(throws_naming([&] { embedding_forward<double>(out.data(), tok.data(), wte.data(), 3, D, V); },
                            {"10", "index 1"}));
  EXPECT_TRUE(throws_naming([&] { embedding_backward<double>(dwte.data(), out.data(), tok.data(), 3, D, V); },
                            {"10", "index 1"}));
  tok = {0, 0, -3};
  EXPECT_TRUE(throws_naming([&] { embedding_forward<double>(out.data(), tok.data(), wte.data(), 3, D, V); },
                            {"-3", "index 2"}));
  for (double g : dwte) EXPECT_EQ(g, 0.0);  // validation happens before any write
}
