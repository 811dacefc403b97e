#include "parallel/expert_balance.h"

#include <algorithm>

#include "core/error.h"

namespace mop {

namespace {

void check_sizes(int ep, int E) {
  MOP_CHECK(ep >= 1 && E > 0 && E % ep == 0, "{} experts cannot be split evenly over an expert-parallel group of {}", E,
            ep);
}

}  // namespace

std::vector<int64_t> expert_loads(int ep, int E, const int64_t* counts, const std::vector<uint8_t>& moved) {
  check_sizes(ep, E);
  MOP_CHECK(moved.empty() || moved.size() == size_t(ep) * size_t(E), "expert_loads: {} moved flags for {} x {} blocks",
            moved.size(), ep, E);
  const int El = E / ep;
  const size_t W = size_t(E + ep);
  std::vector<int64_t> load(size_t(ep), 0);
  for (int s = 0; s < ep; ++s)
    for (int e = 0; e < E; ++e) {
      const bool mv = !moved.empty() && moved[size_t(s) * size_t(E) + size_t(e)];
      load[size_t(mv ? s : e / El)] += counts[size_t(s) * W + size_t(e)];
    }
  return load;
}

std::vector<uint8_t> plan_expert_balance(int ep, int E, const int64_t* counts, const ExpertBalanceOptions& o) {
  check_sizes(ep, E);
  std::vector<uint8_t> moved(size_t(ep) * size_t(E), 0);
  if (ep == 1 || o.max_guests <= 0) return moved;
  const int El = E / ep;
  const size_t W = size_t(E + ep);
  const int64_t least = std::max<int64_t>(o.min_rows, 1);
  std::vector<int64_t> load = expert_loads(ep, E, counts, {});
  std::vector<int> guests(size_t(ep), 0);
  for (;;) {
    const int hot = int(std::max_element(load.begin(), load.end()) - load.begin());  // the first of equals
    int64_t best_gain = 0;
    int best_e = -1, best_s = -1;
    for (int e = hot * El; e < (hot + 1) * El; ++e)
      for (int s = 0; s < ep; ++s) {
        if (s == hot || moved[size_t(s) * size_t(E) + size_t(e)] || guests[size_t(s)] >= o.max_guests) continue;
        const int64_t c = counts[size_t(s) * W + size_t(e)];
        if (c < least) continue;
        const int64_t gain = load[size_t(hot)] - std::max(load[size_t(hot)] - c, load[size_t(s)] + c);
        if (gain >= least && gain > best_gain) best_gain = gain, best_e = e, best_s = s;
      }
    if (best_e < 0) break;
    const int64_t c = counts[size_t(best_s) * W + size_t(best_e)];
    moved[size_t(best_s) * size_t(E) + size_t(best_e)] = 1;
    load[size_t(hot)] -= c;
    load[size_t(best_s)] += c;
    ++guests[size_t(best_s)];
  }
  return moved;
}

}  // namespace mop
