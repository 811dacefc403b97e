#include "data/loader.h"

#include <algorithm>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/rng.h"

namespace mop::data {

namespace fs = std::filesystem;

// ---- TokenStream -------------------------------------------------------------------------

TokenStream::TokenStream(int vocab_size) : vocab_(vocab_size) {
  MOP_CHECK(vocab_size > 0, "TokenStream: vocab_size must be > 0, got {}", vocab_size);
}

TokenStream TokenStream::from_files(const std::vector<std::string>& paths, int vocab_size) {
  TokenStream s(vocab_size);
  for (const auto& p : paths) s.add_shard(p);
  return s;
}

TokenStream TokenStream::from_dir(const std::string& dir, const std::string& prefix,
                                  int vocab_size) {
  std::error_code ec;
  MOP_CHECK(fs::is_directory(dir, ec), "data directory {} does not exist or is not a directory",
            dir);
  std::vector<std::string> names;
  // error_code overloads: a listing failure must surface as mop::Error, not filesystem_error.
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    std::error_code fec;
    if (it->is_regular_file(fec) && name.starts_with(prefix) && name.ends_with(".bin"))
      names.push_back(name);
  }
  MOP_CHECK(!ec, "cannot list data directory {}: {}", dir, ec.message());
  MOP_CHECK(!names.empty(), "data directory {} has no files matching {}*.bin", dir, prefix);
  // Sorted so the stream order (and so every batch) does not depend on directory order.
  std::sort(names.begin(), names.end());
  TokenStream s(vocab_size);
  for (const auto& n : names) s.add_shard((fs::path(dir) / n).string());
  return s;
}

TokenStream TokenStream::from_tokens(std::vector<int32_t> tokens, int vocab_size) {
  TokenStream s(vocab_size);
  s.add_tokens(std::move(tokens));
  return s;
}

void TokenStream::add_shard(const std::string& path) {
  ShardView v(path);
  v.validate_vocab(vocab_);
  Source src;
  src.start = total_;
  src.size = v.size();
  src.shard.emplace(std::move(v));
  total_ += src.size;
  sources_.push_back(std::move(src));
}

void TokenStream::add_tokens(std::vector<int32_t> tokens) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    MOP_CHECK(tokens[i] >= 0 && tokens[i] < vocab_,
              "in-memory tokens: token {} at token index {} is outside the vocabulary of {}",
              tokens[i], i, vocab_);
  }
  Source src;
  src.start = total_;
  src.size = tokens.size();
  src.tokens = std::move(tokens);
  total_ += src.size;
  sources_.push_back(std::move(src));
}

void TokenStream::read(uint64_t begin, uint64_t n, int32_t* out) const {
  MOP_CHECK(begin <= total_ && n <= total_ - begin,
            "TokenStream: read of tokens [{}, {}) is out of range (the stream has {} tokens)",
            begin, begin + n, total_);
  // The last source starting at or before begin; empty sources are skipped by the loop.
  auto it = std::upper_bound(sources_.begin(), sources_.end(), begin,
                             [](uint64_t pos, const Source& s) { return pos < s.start; });
  size_t si = it == sources_.begin() ? 0 : size_t(it - sources_.begin()) - 1;
  while (n > 0) {
    MOP_ASSERT(si < sources_.size());
    const Source& s = sources_[si];
    const uint64_t off = begin - s.start;
    if (off >= s.size) {
      ++si;
      continue;
    }
    const uint64_t take = std::min(n, s.size - off);
    if (s.shard)
      s.shard->read(off, take, out);
    else
      std::copy_n(s.tokens.begin() + ptrdiff_t(off), take, out);
    out += take;
    begin += take;
    n -= take;
    ++si;
  }
}

// ---- Cursor ------------------------------------------------------------------------------

void to_json(nlohmann::json& j, const Cursor& c) {
  j = nlohmann::json{{"epoch", c.epoch}, {"index", c.index}};
}

void from_json(const nlohmann::json& j, Cursor& c) {
  // Checkpoints are user-editable files; report a damaged cursor in our own terms.
  MOP_CHECK(j.is_object() && j.contains("epoch") && j.contains("index") &&
                j["epoch"].is_number_unsigned() && j["index"].is_number_unsigned(),
            "data cursor must be an object with unsigned integers \"epoch\" and \"index\", "
            "got {}",
            j.dump());
  c.epoch = j["epoch"].get<uint64_t>();
  c.index = j["index"].get<uint64_t>();
}

// ---- Loader ------------------------------------------------------------------------------

Loader::Loader(TokenStream stream, int seq_len, uint64_t seed, int32_t bos)
    : stream_(std::move(stream)), seq_len_(seq_len), seed_(seed), bos_(bos) {
  MOP_CHECK(seq_len >= 1, "loader: seq_len must be >= 1, got {}", seq_len);
  const uint64_t L = stream_.size();
  MOP_CHECK(L >= uint64_t(seq_len) + 1,
            "loader: data has {} tokens, fewer than seq_len + 1 = {}, so not even one "
            "training window fits",
            L, uint64_t(seq_len) + 1);
  windows_ = (L - 1) / uint64_t(seq_len);
  window_.resize(size_t(seq_len) + 1);
}

std::vector<uint64_t> Loader::epoch_order(uint64_t epoch) const {
  // Each epoch's order is a pure function of (seed, epoch): resuming needs only the cursor,
  // not the generator state, and epochs do not depend on how many draws earlier ones made.
  Rng base(hash_seed(seed_, "mop.data.loader.epoch"));
  Rng ep(epoch);  // one SplitMix step scatters consecutive epoch numbers over 2^64
  Rng rng(base.next_u64() ^ ep.next_u64());
  std::vector<uint64_t> order(windows_);
  for (uint64_t i = 0; i < windows_; ++i) order[i] = i;
  // Fisher-Yates: uniform over permutations (up to the modulo bias of below(), which is
  // negligible for window counts far below 2^64).
  for (uint64_t i = windows_; i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
  return order;
}

void Loader::set_cursor(Cursor c) {
  MOP_CHECK(c.index <= windows_,
            "loader: cursor index {} is past the end of the epoch ({} windows); was it saved "
            "with different data or seq_len?",
            c.index, windows_);
  cur_ = c;
}

uint64_t Loader::next_window() {
  if (cur_.index >= windows_) {
    ++cur_.epoch;
    cur_.index = 0;
  }
  if (order_epoch_ != cur_.epoch) {
    order_ = epoch_order(cur_.epoch);
    order_epoch_ = cur_.epoch;
  }
  return order_[cur_.index++];
}

void Loader::next_batch(int rows, Batch& b) { next_batch(rows, b, 0, rows); }

void Loader::next_batch(int rows, Batch& b, int first, int count) {
  MOP_CHECK(rows >= 1, "loader: rows must be >= 1, got {}", rows);
  MOP_CHECK(first >= 0 && count >= 1 && first + count <= rows, "loader: rows [{}, {}) are not inside a batch of {}",
            first, first + count, rows);
  const size_t T = size_t(seq_len_);
  const size_t N = size_t(count) * T;
  MOP_CHECK(N <= size_t(INT32_MAX), "loader: batch of {} x {} tokens overflows int32 offsets",
            count, T);
  b.rows = count;
  b.seq_len = seq_len_;
  b.inputs.resize(N);
  b.targets.resize(N);
  b.positions.resize(N);
  b.cu_seqlens.clear();
  for (int r = 0; r < rows; ++r) {
    const uint64_t w = next_window();  // every rank walks the whole batch: the cursor stays global
    if (r < first || r >= first + count) continue;
    stream_.read(w * T, T + 1, window_.data());
    const size_t base = size_t(r - first) * T;
    std::copy_n(window_.begin(), T, b.inputs.begin() + ptrdiff_t(base));
    std::copy_n(window_.begin() + 1, T, b.targets.begin() + ptrdiff_t(base));
    // A row starts a document even mid-document: the model cannot see the previous row,
    // so the tokens at the start of a row have no context either way.
    int32_t pos = 0;
    for (size_t t = 0; t < T; ++t) {
      if (t == 0 || window_[t] == bos_) {
        b.cu_seqlens.push_back(int32_t(base + t));
        pos = 0;
      }
      b.positions[base + t] = pos++;
    }
  }
  b.cu_seqlens.push_back(int32_t(N));
}

}  // namespace mop::data
