// Least-loaded expert balancing (parallel.ep_balance): which blocks of an expert-parallel layer's
// pairs are computed on their source rank instead of on their expert's owner.
//
// Under expert parallelism a rank's expert work is every pair the group routed to its experts; with
// a skewed router the ranks' loads differ, and each exchange of the layer makes the lighter ranks wait
// for the heaviest. Every rank knows every rank's pairs per expert (the exchange plan's all-gather),
// so all of them can compute the same reassignment from it without another round. The unit moved is
// a block (s, e): the pairs rank s routed to expert e. Rank s computes them itself, as a guest of e,
// with e's weights lent by its owner; the block's weight gradient goes back and is added to the
// owner's. The block's token rows never travel; e's weights (3 D F bf16) and their gradient do, on a
// stream beside the exchange (model/cuda/gpu_decoder_comm.cpp).
//
// Same math: every pair is still computed once, by the same expert weights; the owner's weight
// gradient gains the block's as one more (separately rounded) addend, and each token's output sums
// one more partial, so only the reduction order changes.
//
// The plan is a greedy descent on the largest load: while the most loaded rank o (the lowest on a
// tie) owns a block (s, e), s != o, of at least min_rows pairs whose move to s lowers
// max(load o, load s) by at least min_rows, the move that lowers it most is made (ties: lowest
// expert, then lowest source), at most max_guests guest experts per rank. Each move strictly lowers
// the sum of squared loads, so the descent ends. Pure and deterministic: the same on every rank.
#pragma once
#include <cstdint>
#include <vector>

namespace mop {

struct ExpertBalanceOptions {
  int64_t min_rows = 128;  // smallest block, and smallest gain, worth a move (a move costs a weight transfer)
  int max_guests = 4;      // experts one rank may compute as a guest per layer (bounds its borrowed weights)
};

// counts: (ep, E + ep) as make_token_exchange_plan takes them (pairs per global expert, then tokens
// per rank, for every source). Returns moved: (ep, E) row-major 0/1, moved[s * E + e] = 1 when rank s
// computes its own pairs of expert e. Experts are owned as in token_exchange.h (rank e / (E / ep)).
std::vector<uint8_t> plan_expert_balance(int ep, int E, const int64_t* counts, const ExpertBalanceOptions& o);

// Pairs each rank computes under `moved` (empty: nothing moved): its experts' pairs from every
// source except the moved blocks, plus the blocks it computes as a guest.
std::vector<int64_t> expert_loads(int ep, int E, const int64_t* counts, const std::vector<uint8_t>& moved);

// How even expert-parallel layers were, summed over layers (and micro-batches): the most loaded
// rank's pairs with the moves and without them, the mean rank's, and this rank's guest pairs.
// max / mean is 1 when even; the lighter ranks wait at every exchange for the most loaded.
struct EpLoad {
  double max = 0, max_unbalanced = 0, mean = 0;
  int64_t guest_pairs = 0;
  void add(const EpLoad& o) {
    max += o.max, max_unbalanced += o.max_unbalanced, mean += o.mean, guest_pairs += o.guest_pairs;
  }
};

}  // namespace mop
