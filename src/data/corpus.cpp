#include "data/corpus.h"

#include <array>
#include <cmath>
#include <string_view>

#include "core/error.h"
#include "core/rng.h"

namespace mop::data {

namespace {

// Word lists are deliberately small: the model should learn them within a few hundred
// steps, and the stories stay learnable because every later sentence refers back to the
// animal, name and place chosen in the first sentences.
constexpr std::array<std::string_view, 8> kNames = {"Tom", "Anna", "Ben", "Lily",
                                                     "Sam", "Mia",  "Max", "Rosa"};
constexpr std::array<std::string_view, 8> kAnimals = {"fox",  "cat", "dog",  "bird",
                                                      "frog", "owl", "bear", "rabbit"};
constexpr std::array<std::string_view, 6> kSizes = {"small", "big", "little",
                                                    "old",   "young", "tiny"};
constexpr std::array<std::string_view, 6> kColors = {"red",   "brown", "gray",
                                                     "white", "black", "green"};
constexpr std::array<std::string_view, 6> kPlaces = {"river", "forest", "hill",
                                                     "farm",  "lake",   "garden"};
constexpr std::array<std::string_view, 6> kFoods = {"apples",  "fish",  "berries",
                                                    "carrots", "honey", "seeds"};
constexpr std::array<std::string_view, 5> kFeelings = {"happy", "sad", "tired", "scared",
                                                       "hungry"};
constexpr std::array<std::string_view, 5> kGames = {"ran", "sang", "jumped", "played",
                                                    "danced"};
constexpr std::array<std::string_view, 4> kThings = {"ball", "hat", "box", "kite"};

template <size_t N>
std::string_view pick(Rng& rng, const std::array<std::string_view, N>& words) {
  return words[rng.below(N)];
}

std::string_view article(std::string_view word) {
  return std::string_view("aeiou").find(word.front()) != std::string_view::npos ? "an" : "a";
}

// One story: an opening, then a fixed-order sequence of events, some optional and some
// with alternative templates, so documents differ in structure as well as in words.
std::string make_story(Rng& rng) {
  const std::string_view name = pick(rng, kNames);
  const std::string_view animal = pick(rng, kAnimals);
  const std::string_view size = pick(rng, kSizes);
  const std::string_view color = pick(rng, kColors);
  const std::string_view place = pick(rng, kPlaces);
  const std::string_view food = pick(rng, kFoods);
  std::string s;

  s += fmt::format("Once upon a time, {} {} {} {} lived near the {}. ", article(size), size,
                   color, animal, place);
  s += fmt::format("The {} liked to eat {}. ", animal, food);
  if (rng.below(2)) {
    s += fmt::format("Every morning, the {} {} by the {}. ", animal, pick(rng, kGames), place);
  }
  s += fmt::format("One day, the {} met {}. ", animal, name);
  switch (rng.below(3)) {
    case 0:
      s += fmt::format("{} said, \"Hello, {}! Do you want to play?\" ", name, animal);
      s += fmt::format("The {} said, \"Yes!\" ", animal);
      break;
    case 1: {
      const std::string_view thing = pick(rng, kThings);
      s += fmt::format("{} had {} {} {}. ", name, article(color), color, thing);
      s += fmt::format("The {} wanted to play with the {}. ", animal, thing);
      break;
    }
    default: {
      const std::string_view feeling = pick(rng, kFeelings);
      s += fmt::format("The {} was {}. ", animal, feeling);
      s += fmt::format("{} asked, \"Why are you {}?\" ", name, feeling);
      break;
    }
  }
  s += fmt::format("{} gave the {} some {}. ", name, animal, food);
  s += fmt::format("The {} was very happy. ", animal);
  if (rng.below(2)) {
    s += fmt::format("They {} together near the {}. ", pick(rng, kGames), place);
  }
  s += fmt::format("When the sun went down, {} went home and the {} went to sleep. ", name,
                   animal);
  s += "The end.";
  return s;
}

}  // namespace

std::vector<std::string> builtin_corpus(int n_docs, uint64_t seed) {
  MOP_CHECK(n_docs >= 0, "builtin_corpus: n_docs must be >= 0, got {}", n_docs);
  // One stream for the whole corpus, derived from seed and a purpose tag so the corpus
  // does not correlate with other users of the same seed (init, loader order).
  Rng rng(hash_seed(seed, "mop.data.builtin_corpus"));
  std::vector<std::string> docs;
  docs.reserve(size_t(n_docs));
  for (int i = 0; i < n_docs; ++i) {
    docs.push_back(make_story(rng));
    // The templates bound the length; this guards the documented range if they change.
    MOP_ASSERT(docs.back().size() >= 200 && docs.back().size() <= 600);
  }
  return docs;
}

double unigram_entropy_nats(const std::vector<int32_t>& tokens, int vocab) {
  MOP_CHECK(vocab > 0, "unigram_entropy_nats: vocab must be > 0, got {}", vocab);
  std::vector<uint64_t> counts(size_t(vocab), 0);
  for (size_t i = 0; i < tokens.size(); ++i) {
    MOP_CHECK(tokens[i] >= 0 && tokens[i] < vocab,
              "unigram_entropy_nats: token {} at index {} is outside the vocabulary of {}",
              tokens[i], i, vocab);
    ++counts[size_t(tokens[i])];
  }
  if (tokens.empty()) return 0.0;
  const double n = double(tokens.size());
  double h = 0.0;
  for (uint64_t c : counts) {
    if (c == 0) continue;
    const double p = double(c) / n;
    h -= p * std::log(p);
  }
  return h;
}

}  // namespace mop::data
