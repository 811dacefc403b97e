// Packing loader: serves fixed-shape batches of next-token-prediction windows cut from a
// token stream, in a seeded per-epoch shuffle, with a resumable cursor.
//
// Windows are seq_len + 1 tokens with stride seq_len, so consecutive windows share one
// token and every token of the stream (but the first) is a target exactly once per epoch.
// Documents are packed back to back rather than padded; the batch carries cu_seqlens and
// positions so attention can be restricted to each document and RoPE restarts per document.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "data/shard.h"
#include "data/tokenizer.h"

namespace mop::data {

// The concatenation of shard files (memory-mapped) and/or in-memory token arrays, in the
// order they were added. Every source is checked against the vocabulary when it is added,
// so a bad token fails at startup rather than mid-run.
class TokenStream {
 public:
  explicit TokenStream(int vocab_size);
  // Shard files in the given order.
  static TokenStream from_files(const std::vector<std::string>& paths, int vocab_size);
  // The regular files in dir whose names start with prefix and end in ".bin" (leftover
  // ".tmp" files of an interrupted write are skipped), in sorted name order.
  static TokenStream from_dir(const std::string& dir, const std::string& prefix,
                              int vocab_size);
  static TokenStream from_tokens(std::vector<int32_t> tokens, int vocab_size);

  void add_shard(const std::string& path);
  void add_tokens(std::vector<int32_t> tokens);

  uint64_t size() const { return total_; }
  int vocab_size() const { return vocab_; }
  // Copies tokens [begin, begin + n) to out, crossing source boundaries as needed.
  void read(uint64_t begin, uint64_t n, int32_t* out) const;

 private:
  struct Source {
    std::optional<ShardView> shard;  // set for a shard source
    std::vector<int32_t> tokens;     // the tokens of an in-memory source
    uint64_t start = 0, size = 0;  // position in the stream
  };
  int vocab_;
  uint64_t total_ = 0;
  std::vector<Source> sources_;
};

// One packed batch: rows windows laid end to end as N = rows * seq_len tokens.
struct Batch {
  int rows = 0, seq_len = 0;
  std::vector<int32_t> inputs;      // N: window[0 .. T)
  std::vector<int32_t> targets;     // N: window[1 .. T]
  std::vector<int32_t> positions;   // N: index within the token's document, from 0
  std::vector<int32_t> cu_seqlens;  // document starts over the packed N tokens, then N
};

// Where the loader is: the next window is permutation(epoch)[index].
struct Cursor {
  uint64_t epoch = 0, index = 0;
  bool operator==(const Cursor&) const = default;
};
void to_json(nlohmann::json& j, const Cursor& c);
void from_json(const nlohmann::json& j, Cursor& c);  // throws mop::Error on a bad object

class Loader {
 public:
  // Throws when the stream holds no complete window (fewer than seq_len + 1 tokens).
  // bos is the token that starts a document (the byte tokenizer's by default).
  Loader(TokenStream stream, int seq_len, uint64_t seed, int32_t bos = kBos);

  // Fills b with the next rows windows, moving into the next epoch when this one runs out
  // (a batch may straddle two epochs). b's vectors are reused to avoid reallocation.
  void next_batch(int rows, Batch& b);
  // The same batch's rows [first, first + count) only: a data-parallel rank's part of a global
  // batch. The cursor advances by all rows, so every rank stays at the same position.
  void next_batch(int rows, Batch& b, int first, int count);

  Cursor cursor() const { return cur_; }
  // Resume: the batches after set_cursor(c) equal those after the cursor() that gave c.
  void set_cursor(Cursor c);

  uint64_t num_windows() const { return windows_; }
  uint64_t num_tokens() const { return stream_.size(); }
  int seq_len() const { return seq_len_; }
  const TokenStream& stream() const { return stream_; }

  // The window order of one epoch (a permutation of 0 .. num_windows() - 1). Exposed for
  // tests and tools; next_batch uses the same function.
  std::vector<uint64_t> epoch_order(uint64_t epoch) const;

 private:
  uint64_t next_window();  // advances the cursor

  TokenStream stream_;
  int seq_len_;
  uint64_t seed_;
  int32_t bos_;
  uint64_t windows_;
  Cursor cur_;
  uint64_t order_epoch_ = ~uint64_t(0);  // epoch whose order is in order_
  std::vector<uint64_t> order_;
  std::vector<int32_t> window_;  // scratch: one window of seq_len + 1 tokens
};

}  // namespace mop::data
