// The token-once expert-parallel exchange (parallel/token_exchange.h, ops/cuda/moe_ep.h) with the
// exchange itself simulated on the host: P ranks' routings on one GPU, every row moved between the
// ranks' buffers as the all-to-all-v would. Checked against a direct CPU construction of the
// definition (each pair's row among its owner's (local expert, source, token) rows):
//   token counts, send slots, pair rows and gates        exact (integers, bit copies)
//   the owners' expanded pair rows                       exact (bit copies)
//   outputs: per-rank gate-weighted partial rows (bf16), summed at home (bf16); input gradients
//     the same with weight 1: fp32 sums in k and rank order on both sides, each partial rounded
//     to bf16 as it travels; rtol 4 kBf16Eps (the GPU's fused multiply-adds can move a rounding by
//     one bf16 step at each of the two roundings), atol 1e-5
//   gate gradients: fp32 dots over D products of size <= 1: rtol 1e-5, atol 1e-6 D
// Sizes are odd, one rank routes nothing, one expert is hot and one is never picked.
// Balanced (parallel/expert_balance.h): the same with blocks of pairs moved to their sources,
// which compute them as guest rows: the moved pairs absent on the owners, the guest rows exact bit
// copies, and each token's outputs and input gradients with the guests' partial (rounded to bf16
// like the others) added at home, gate gradients with the guests'.
#include "ops/cuda/moe_ep.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <tuple>

#include "cuda_test_util.h"
#include "ops/cpu/moe_permute.h"
#include "ops/cuda/moe_permute.h"
#include "parallel/expert_balance.h"
#include "parallel/token_exchange.h"

using namespace mop;
using namespace mop::test;

namespace {

struct Rank {
  int N = 0;
  std::vector<int32_t> idx, row, offsets;
  std::vector<float> w, x;  // (N, K), (N, D) bf16 values
};

// K distinct experts per token; expert 1 is in every other token's set, expert E - 1 in none.
Rank make_rank(int N, int E, int K, int D, uint64_t seed) {
  std::mt19937_64 g(seed);
  Rank r;
  r.N = N;
  r.idx.resize(size_t(N) * K);
  for (int n = 0; n < N; ++n) {
    std::vector<int32_t> perm(size_t(E - 1));
    std::iota(perm.begin(), perm.end(), 0);
    if (n % 2 == 0) std::swap(perm[0], perm[1]);
    for (int k = (n % 2 == 0); k < K; ++k) std::swap(perm[size_t(k)], perm[size_t(k) + g() % size_t(E - 1 - k)]);
    std::copy_n(perm.begin(), K, r.idx.begin() + size_t(n) * K);
  }
  r.w = random_bf16_values(size_t(N) * K, seed + 1);
  r.x = random_bf16_values(size_t(N) * D, seed + 2);
  r.row.resize(r.idx.size());
  r.offsets.resize(size_t(E) + 1);
  cpu::moe_route_layout(r.row.data(), r.offsets.data(), r.idx.data(), N, E, K);
  return r;
}

// balance: move blocks as plan_expert_balance decides (min_rows 1, at most 2 guests a rank).
void run_case(int P, int E, int K, int D, const std::vector<int>& Ns, bool balance = false) {
  SCOPED_TRACE("P=" + std::to_string(P) + " E=" + std::to_string(E) + " K=" + std::to_string(K) +
               " D=" + std::to_string(D) + (balance ? " balanced" : ""));
  const int El = E / P;
  auto owner = [&](int e) { return e / El; };
  std::vector<Rank> rk;
  for (int s = 0; s < P; ++s) rk.push_back(make_rank(Ns[size_t(s)], E, K, D, 1000 + 17 * s));
  std::vector<int64_t> counts(size_t(P) * (E + P));
  std::vector<uint8_t> moved;
  auto mv = [&](int s, int e) { return !moved.empty() && e >= 0 && e < E && moved[size_t(s) * E + e] != 0; };
  if (balance) {  // the moves from the pair counts alone (the token counts play no part)
    for (int s = 0; s < P; ++s)
      for (int e = 0; e < E; ++e)
        counts[size_t(s) * (E + P) + e] = rk[size_t(s)].offsets[size_t(e) + 1] - rk[size_t(s)].offsets[size_t(e)];
    ExpertBalanceOptions o;
    o.min_rows = 1, o.max_guests = 2;
    moved = plan_expert_balance(P, E, counts.data(), o);
    ASSERT_TRUE(std::count(moved.begin(), moved.end(), uint8_t(1)) > 0) << "nothing moved: the case tests nothing";
  }

  // The definition: owner q's pair rows are (local expert, source, token) without the moved
  // blocks; key (s, n, k). A moved pair's row is on its source, among the guest rows (expert, token).
  std::map<std::tuple<int, int, int>, int> pair_row, guest_row;
  std::vector<int> pairs_on(static_cast<size_t>(P), 0), guests_on(static_cast<size_t>(P), 0);
  for (int q = 0; q < P; ++q)
    for (int j = 0; j < El; ++j)
      for (int s = 0; s < P; ++s)
        for (int n = 0; n < rk[size_t(s)].N; ++n)
          for (int k = 0; k < K; ++k)
            if (rk[size_t(s)].idx[size_t(n) * K + k] == q * El + j && !mv(s, q * El + j))
              pair_row[{s, n, k}] = pairs_on[size_t(q)]++;
  for (int s = 0; s < P; ++s)
    for (int e = 0; e < E; ++e)
      for (int n = 0; n < rk[size_t(s)].N; ++n)
        for (int k = 0; k < K; ++k)
          if (rk[size_t(s)].idx[size_t(n) * K + k] == e && mv(s, e)) guest_row[{s, n, k}] = guests_on[size_t(s)]++;
  auto has = [&](int s, int n, int q) {
    for (int k = 0; k < K; ++k)
      if (owner(rk[size_t(s)].idx[size_t(n) * K + k]) == q) return true;
    return false;
  };

  // Token counts on the device, and every rank's plan from the gathered counts.
  struct Dev {
    std::vector<int32_t> tokens, slot, pos;
    std::vector<float> gate;
  };
  std::vector<Dev> dev(static_cast<size_t>(P));
  for (int s = 0; s < P; ++s) {
    const Rank& r = rk[size_t(s)];
    DeviceArray<int32_t> d_idx(r.idx), d_tok(static_cast<size_t>(P));
    cuda::moe_ep_token_counts(d_tok.data(), d_idx.data(), r.N, K, E, P, nullptr);
    dev[size_t(s)].tokens = d_tok.download();
    for (int q = 0; q < P; ++q) {
      int want = 0;
      for (int n = 0; n < r.N; ++n) want += has(s, n, q);
      ASSERT_EQ(dev[size_t(s)].tokens[size_t(q)], want) << "rank " << s << " tokens for " << q;
    }
    for (int e = 0; e < E; ++e) counts[size_t(s) * (E + P) + e] = r.offsets[size_t(e) + 1] - r.offsets[size_t(e)];
    for (int q = 0; q < P; ++q) counts[size_t(s) * (E + P) + E + q] = dev[size_t(s)].tokens[size_t(q)];
    // The same row made on the device (what the exchange all-gathers there).
    DeviceArray<int32_t> d_off(r.offsets);
    DeviceArray<int64_t> d_row(size_t(E + P));
    cuda::moe_ep_plan_row(d_row.data(), d_off.data(), d_tok.data(), E, P, nullptr);
    const std::vector<int64_t> row = d_row.download();
    for (int i = 0; i < E + P; ++i) ASSERT_EQ(row[size_t(i)], counts[size_t(s) * (E + P) + i]) << "rank " << s << " " << i;
  }
  std::vector<TokenExchangePlan> plan;
  for (int s = 0; s < P; ++s) plan.push_back(make_token_exchange_plan(P, s, E, counts.data(), moved));
  for (int q = 0; q < P; ++q) {
    ASSERT_EQ(plan[size_t(q)].pairs_in(), pairs_on[size_t(q)]) << "rank " << q;
    ASSERT_EQ(plan[size_t(q)].guest_pairs(), guests_on[size_t(q)]) << "rank " << q;
  }

  // Send layouts against the definition.
  for (int s = 0; s < P; ++s) {
    const Rank& r = rk[size_t(s)];
    const TokenExchangePlan& p = plan[size_t(s)];
    const size_t S = size_t(p.tokens_out());
    DeviceArray<int32_t> d_idx(r.idx), d_row(r.row), d_off(r.offsets), d_tok(dev[size_t(s)].tokens),
        d_base(p.dest_base), d_slot(size_t(r.N) * P), d_pos(S * K);
    DeviceArray<float> d_w(r.w), d_gate(S * K);
    cuda::moe_ep_send_layout(d_slot.data(), d_pos.data(), d_gate.data(), d_idx.data(), d_w.data(), d_row.data(),
                             d_off.data(), d_base.data(), d_tok.data(), r.N, K, E, P, nullptr);
    Dev& o = dev[size_t(s)];
    o.slot = d_slot.download(), o.pos = d_pos.download(), o.gate = d_gate.download();
    int next = 0;
    for (int q = 0; q < P; ++q)
      for (int n = 0; n < r.N; ++n) {
        const int slot = o.slot[size_t(n) * P + q];
        if (!has(s, n, q)) {
          ASSERT_EQ(slot, -1) << "rank " << s << " token " << n << " to " << q;
          continue;
        }
        ASSERT_EQ(slot, next++) << "rank " << s << " token " << n << " to " << q;
        for (int k = 0; k < K; ++k) {
          const int e = r.idx[size_t(n) * K + k];
          const bool here = owner(e) == q && !mv(s, e);
          ASSERT_EQ(o.pos[size_t(slot) * K + k], here ? pair_row[std::make_tuple(s, n, k)] : -1) << "pair " << n << "," << k;
          ASSERT_EQ(o.gate[size_t(slot) * K + k], here ? r.w[size_t(n) * K + k] : 0.f);
        }
      }
    ASSERT_EQ(size_t(next), S);
  }

  // The exchange to the owners, expansion, "experts" y = x (1 + j / 8) for local expert j, the
  // owners' partial rows, the exchange back and the sum at home; backward likewise.
  auto sent_rows = [&](int s, int q) {  // [begin, end) of s's send rows for q
    size_t b = 0;
    for (int r = 0; r < q; ++r) b += plan[size_t(s)].send_tokens[size_t(r)];
    return std::pair<size_t, size_t>(b, b + plan[size_t(s)].send_tokens[size_t(q)]);
  };
  std::vector<std::vector<float>> partial_out(static_cast<size_t>(P)), partial_dx(static_cast<size_t>(P)),
      dgate_back(static_cast<size_t>(P));
  for (int s = 0; s < P; ++s) {
    partial_out[size_t(s)].resize(size_t(plan[size_t(s)].tokens_out()) * D);
    partial_dx[size_t(s)].resize(size_t(plan[size_t(s)].tokens_out()) * D);
    dgate_back[size_t(s)].resize(size_t(plan[size_t(s)].tokens_out()) * K);
  }
  std::vector<std::vector<float>> dy(static_cast<size_t>(P));
  for (int s = 0; s < P; ++s) dy[size_t(s)] = random_bf16_values(size_t(rk[size_t(s)].N) * D, 5000 + s);
  for (int q = 0; q < P; ++q) {
    const TokenExchangePlan& p = plan[size_t(q)];
    const int Rt = int(p.tokens_in()), R = int(p.pairs_in());
    ASSERT_EQ(Rt, [&] {
      int t = 0;
      for (int s = 0; s < P; ++s) t += dev[size_t(s)].tokens[size_t(q)];
      return t;
    }());
    std::vector<float> xr, dyr, gate;
    std::vector<int32_t> pos;
    std::vector<int> src_rank, src_token;
    for (int s = 0; s < P; ++s) {
      auto [b, e] = sent_rows(s, q);
      for (size_t i = b; i < e; ++i) {
        int n = 0;  // the token of send row i
        while (dev[size_t(s)].slot[size_t(n) * P + q] != int(i)) ++n;
        src_rank.push_back(s), src_token.push_back(n);
        for (int d = 0; d < D; ++d) {
          xr.push_back(rk[size_t(s)].x[size_t(n) * D + d]);
          dyr.push_back(dy[size_t(s)][size_t(n) * D + d]);
        }
        for (int k = 0; k < K; ++k) {
          pos.push_back(dev[size_t(s)].pos[i * K + k]);
          gate.push_back(dev[size_t(s)].gate[i * K + k]);
        }
      }
    }
    DeviceArray<bf16> d_xr(to_bf16(xr)), d_xl(size_t(std::max(R, 1)) * D);
    DeviceArray<int32_t> d_pos(pos);
    DeviceArray<float> d_gate(gate);
    cuda::moe_permute(d_xl.data(), d_xr.data(), d_pos.data(), Rt, K, D, nullptr);
    std::vector<float> xl = to_f32(d_xl.download());
    std::vector<float> yl(size_t(std::max(R, 1)) * D), dxl(yl.size());
    std::vector<int> row_expert(size_t(std::max(R, 1)), -1);
    for (int j = 0; j < Rt; ++j)
      for (int k = 0; k < K; ++k) {
        const int pr = pos[size_t(j) * K + k];
        if (pr < 0) continue;
        const int e = rk[size_t(src_rank[size_t(j)])].idx[size_t(src_token[size_t(j)]) * K + k];
        row_expert[size_t(pr)] = e - q * El;
        for (int d = 0; d < D; ++d)
          ASSERT_EQ(xl[size_t(pr) * D + d], xr[size_t(j) * D + d]) << "owner " << q << " pair row " << pr;
      }
    for (int pr = 0; pr < R; ++pr) {
      ASSERT_GE(row_expert[size_t(pr)], 0) << "owner " << q << " pair row " << pr << " never written";
      for (int d = 0; d < D; ++d) {
        yl[size_t(pr) * D + d] = round_bf16(xl[size_t(pr) * D + d] * (1.f + row_expert[size_t(pr)] / 8.f));
        dxl[size_t(pr) * D + d] = round_bf16(-0.5f * xl[size_t(pr) * D + d] + 0.25f);
      }
    }
    DeviceArray<bf16> d_yl(to_bf16(yl)), d_dxl(to_bf16(dxl)), d_out(size_t(std::max(Rt, 1)) * D),
        d_dyr(to_bf16(dyr)), d_dyl(yl.size()), d_dxr(size_t(std::max(Rt, 1)) * D);
    DeviceArray<float> d_dgate(size_t(std::max(Rt, 1)) * K);
    cuda::moe_combine(d_out.data(), d_yl.data(), d_gate.data(), d_pos.data(), Rt, K, D, nullptr);
    cuda::moe_combine_backward(d_dyl.data(), d_dgate.data(), d_dyr.data(), d_yl.data(), d_gate.data(), d_pos.data(),
                               Rt, K, D, nullptr);
    cuda::moe_permute_backward(d_dxr.data(), d_dxl.data(), d_pos.data(), Rt, K, D, nullptr);
    const std::vector<float> out = to_f32(d_out.download()), dxr = to_f32(d_dxr.download()),
                             dyl = to_f32(d_dyl.download()), dg = d_dgate.download();
    // The owner's per-pair gradients: gate times the token's d(output).
    std::vector<float> dyl_ref(yl.size(), 0.f);
    for (int j = 0; j < Rt; ++j)
      for (int k = 0; k < K; ++k) {
        const int pr = pos[size_t(j) * K + k];
        if (pr >= 0)
          for (int d = 0; d < D; ++d)
            dyl_ref[size_t(pr) * D + d] = round_bf16(gate[size_t(j) * K + k] * dyr[size_t(j) * D + d]);
      }
    expect_close(std::vector<float>(dyl.begin(), dyl.begin() + size_t(R) * D),
                 std::vector<float>(dyl_ref.begin(), dyl_ref.begin() + size_t(R) * D), 2 * kBf16Eps, 1e-5,
                 "owner pair gradients");
    // Back to the sources' send rows.
    size_t j = 0;
    for (int s = 0; s < P; ++s) {
      auto [b, e] = sent_rows(s, q);
      for (size_t i = b; i < e; ++i, ++j) {
        std::copy_n(out.begin() + j * D, D, partial_out[size_t(s)].begin() + i * D);
        std::copy_n(dxr.begin() + j * D, D, partial_dx[size_t(s)].begin() + i * D);
        std::copy_n(dg.begin() + j * K, K, dgate_back[size_t(s)].begin() + i * K);
      }
    }
  }

  // At home: the guest rows (balanced), sums over the ranks plus the guests' partial, gate
  // gradients to their pairs; against the definition with the same roundings.
  auto expert_y = [&](float xv, int e) { return round_bf16(xv * (1.f + (e - owner(e) * El) / 8.f)); };
  auto expert_dx = [&](float xv) { return round_bf16(-0.5f * xv + 0.25f); };
  for (int s = 0; s < P; ++s) {
    const Rank& r = rk[size_t(s)];
    const TokenExchangePlan& p = plan[size_t(s)];
    const size_t S = std::max<size_t>(size_t(p.tokens_out()), 1), NK = std::max<size_t>(r.idx.size(), 1);
    const int Rg = int(p.guest_pairs());
    DeviceArray<bf16> d_po(to_bf16(partial_out[size_t(s)])), d_pd(to_bf16(partial_dx[size_t(s)])),
        d_y(size_t(std::max(r.N, 1)) * D), d_dx(size_t(std::max(r.N, 1)) * D), d_x(to_bf16(r.x)),
        d_gy(size_t(std::max(r.N, 1)) * D), d_gdx(size_t(std::max(r.N, 1)) * D), d_dy(to_bf16(dy[size_t(s)]));
    DeviceArray<int32_t> d_slot(dev[size_t(s)].slot), d_idx(r.idx), d_row(r.row), d_off(r.offsets),
        d_gbase(p.guest_base), d_gslot(NK);
    DeviceArray<float> d_dg(dgate_back[size_t(s)].empty() ? std::vector<float>(S * K) : dgate_back[size_t(s)]),
        d_dw(NK), d_w(r.w), d_gdg(NK);
    const bool guests = Rg > 0;
    if (guests) {
      cuda::moe_ep_guest_rows(d_gslot.data(), d_idx.data(), d_row.data(), d_off.data(), d_gbase.data(), r.N, K, E,
                              nullptr);
      const std::vector<int32_t> gslot = d_gslot.download();
      for (int n = 0; n < r.N; ++n)
        for (int k = 0; k < K; ++k) {
          const int e = r.idx[size_t(n) * K + k];
          ASSERT_EQ(gslot[size_t(n) * K + k], mv(s, e) ? guest_row[std::make_tuple(s, n, k)] : -1)
              << "rank " << s << " guest row of pair " << n << "," << k;
        }
      // The guest rows from the token rows, the "experts" on them, and back to the tokens.
      DeviceArray<bf16> d_xg(size_t(Rg) * D);
      cuda::moe_permute(d_xg.data(), d_x.data(), d_gslot.data(), r.N, K, D, nullptr);
      const std::vector<float> xg = to_f32(d_xg.download());
      std::vector<float> yg(size_t(Rg) * D), dxg(yg.size());
      for (int n = 0; n < r.N; ++n)
        for (int k = 0; k < K; ++k) {
          const int g = gslot[size_t(n) * K + k];
          if (g < 0) continue;
          for (int d = 0; d < D; ++d) {
            ASSERT_EQ(xg[size_t(g) * D + d], r.x[size_t(n) * D + d]) << "guest row " << g;
            yg[size_t(g) * D + d] = expert_y(xg[size_t(g) * D + d], r.idx[size_t(n) * K + k]);
            dxg[size_t(g) * D + d] = expert_dx(xg[size_t(g) * D + d]);
          }
        }
      DeviceArray<bf16> d_yg(to_bf16(yg)), d_dxg(to_bf16(dxg)), d_dyg(yg.size());
      cuda::moe_combine(d_gy.data(), d_yg.data(), d_w.data(), d_gslot.data(), r.N, K, D, nullptr);
      cuda::moe_permute_backward(d_gdx.data(), d_dxg.data(), d_gslot.data(), r.N, K, D, nullptr);
      cuda::moe_combine_backward(d_dyg.data(), d_gdg.data(), d_dy.data(), d_yg.data(), d_w.data(), d_gslot.data(),
                                 r.N, K, D, nullptr);
    }
    cuda::moe_ep_home_sum(d_y.data(), d_po.data(), d_slot.data(), guests ? d_gy.data() : nullptr, r.N, P, D, nullptr);
    cuda::moe_ep_home_sum(d_dx.data(), d_pd.data(), d_slot.data(), guests ? d_gdx.data() : nullptr, r.N, P, D, nullptr);
    cuda::moe_ep_gate_grads(d_dw.data(), d_dg.data(), d_slot.data(), d_idx.data(), r.N, K, E, P, nullptr,
                            guests ? d_gdg.data() : nullptr);
    const std::vector<float> y = to_f32(d_y.download()), dx = to_f32(d_dx.download()), dw = d_dw.download();
    std::vector<float> y_ref(size_t(r.N) * D), dx_ref(y_ref.size()), dw_ref(r.idx.size());
    for (int n = 0; n < r.N; ++n)
      for (int d = 0; d < D; ++d) {
        const float xv = r.x[size_t(n) * D + d];
        float ys = 0.f, dxs = 0.f, gy = 0.f, gd = 0.f;
        for (int q = 0; q < P; ++q) {
          float py = 0.f, pd = 0.f;
          bool any = false;
          for (int k = 0; k < K; ++k) {
            const int e = r.idx[size_t(n) * K + k];
            if (owner(e) != q || mv(s, e)) continue;
            any = true;
            py += r.w[size_t(n) * K + k] * expert_y(xv, e);
            pd += expert_dx(xv);
          }
          if (any) ys += round_bf16(py), dxs += round_bf16(pd);
        }
        for (int k = 0; k < K; ++k) {
          const int e = r.idx[size_t(n) * K + k];
          if (!mv(s, e)) continue;
          gy += r.w[size_t(n) * K + k] * expert_y(xv, e);
          gd += expert_dx(xv);
        }
        if (guests) ys += round_bf16(gy), dxs += round_bf16(gd);
        y_ref[size_t(n) * D + d] = round_bf16(ys), dx_ref[size_t(n) * D + d] = round_bf16(dxs);
      }
    for (int n = 0; n < r.N; ++n)
      for (int k = 0; k < K; ++k) {
        const int e = r.idx[size_t(n) * K + k];
        double dot = 0;
        for (int d = 0; d < D; ++d)
          dot += double(dy[size_t(s)][size_t(n) * D + d]) * expert_y(r.x[size_t(n) * D + d], e);
        dw_ref[size_t(n) * K + k] = float(dot);
      }
    expect_close(std::vector<float>(y.begin(), y.begin() + size_t(r.N) * D), y_ref, 4 * kBf16Eps, 1e-5,
                 "outputs of rank " + std::to_string(s));
    expect_close(std::vector<float>(dx.begin(), dx.begin() + size_t(r.N) * D), dx_ref, 4 * kBf16Eps, 1e-5,
                 "input gradients of rank " + std::to_string(s));
    expect_close(std::vector<float>(dw.begin(), dw.begin() + r.idx.size()), dw_ref, 1e-5, 1e-6 * D,
                 "gate gradients of rank " + std::to_string(s));
  }
}

TEST(MoeEp, TokenOnceExchangeMatchesDefinition) {
  MOP_REQUIRE_GPU();
  run_case(2, 8, 3, 40, {37, 29});          // scalar rows (D % 8 != 0)
  run_case(3, 12, 4, 64, {53, 0, 41});      // vector rows; a rank routing nothing
  run_case(4, 16, 8, 24, {19, 33, 7, 26});  // top-k larger than the group
}

TEST(MoeEp, BalancedExchangeMatchesDefinition) {
  MOP_REQUIRE_GPU();
  run_case(2, 8, 3, 40, {37, 29}, /*balance=*/true);
  run_case(3, 12, 4, 64, {53, 0, 41}, true);
  run_case(4, 16, 8, 24, {19, 33, 7, 26}, true);
}

}  // namespace
