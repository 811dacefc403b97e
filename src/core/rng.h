// Deterministic random numbers. The state is one 64-bit word so it can be saved in a
// checkpoint and restored exactly. Parameter init derives a stream per parameter from
// (seed, name) so values do not depend on allocation order or on how parameters are sharded.
#pragma once
#include <cmath>
#include <cstdint>
#include <string_view>

namespace mop {

class Rng {
 public:
  explicit Rng(uint64_t seed = 0) : state_(seed) {}
  uint64_t state() const { return state_; }
  void set_state(uint64_t s) { state_ = s; }

  // SplitMix64: passes BigCrush, one add and three mixes per draw.
  uint64_t next_u64() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return double(next_u64() >> 11) * 0x1.0p-53; }
  // Uniform integer in [0, n).
  uint64_t below(uint64_t n) { return n ? next_u64() % n : 0; }
  // Standard normal by Box-Muller (one value per call; the pair's second half is dropped
  // so the state advances by a fixed amount per draw).
  double normal() {
    double u1 = uniform(), u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  uint64_t state_;
};

// FNV-1a of a name mixed with a seed: a stable stream id per parameter.
inline uint64_t hash_seed(uint64_t seed, std::string_view name) {
  uint64_t h = 1469598103934665603ull ^ (seed * 0x9e3779b97f4a7c15ull);
  for (char c : name) {
    h ^= uint8_t(c);
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace mop
