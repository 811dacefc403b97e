#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace mop {

size_t edit_distance(std::string_view a, std::string_view b);
// The candidate closest to `word` by edit distance (ties: first), or "" when none is close
// enough to be a plausible typo (more than half the word differs).
std::string nearest(std::string_view word, const std::vector<std::string>& candidates);
// " (did you mean 'x'?)" or "".
std::string did_you_mean(std::string_view word, const std::vector<std::string>& candidates);
std::string human_count(double n);      // 12.3k, 4.56M, 1.20B
std::string human_seconds(double s);    // 1h02m, 3m12s, 45s

}  // namespace mop
