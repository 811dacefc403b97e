// Offline preparation: text files -> tokenized train/val shards that the loader maps.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mop::data {

struct PrepareStats {
  uint64_t docs = 0, tokens = 0;              // all documents (BOS and EOS included)
  uint64_t train_docs = 0, train_tokens = 0;
  uint64_t val_docs = 0, val_tokens = 0;
  uint64_t train_shards = 0, val_shards = 0;  // files written
};

// Each document becomes BOS + its bytes + EOS, concatenated in order. The markers let the
// loader find document boundaries inside a packed window (and the model learn them).
std::vector<int32_t> tokenize_documents(const std::vector<std::string>& docs);

// Splits text into documents at blank lines (one or more lines that are empty or hold only
// whitespace); each document is its lines joined by '\n', without the separating blank
// lines. Empty documents are dropped.
std::vector<std::string> split_documents(const std::string& text);

// Reads input_files, splits them into documents, sends each to val with probability
// val_fraction (drawn from seed; with >= 2 documents and val_fraction > 0 at least one goes
// to val, and with val_fraction < 1 at least one stays in train), and writes
//   out_dir/train_000000.bin, train_000001.bin, ...  (each <= shard_tokens tokens)
//   out_dir/val_000000.bin                           (only when there is a val document)
// Documents are never split across shards, so a document longer than shard_tokens is an
// error. out_dir is created; shard files of an earlier run there (train_NNNNNN.bin,
// val_NNNNNN.bin) are removed first, so the directory never mixes two preparations. All
// inputs are read and checked before anything is written or removed.
PrepareStats prepare_shards(const std::vector<std::string>& input_files,
                            const std::string& out_dir, double val_fraction, uint64_t seed,
                            size_t shard_tokens);

}  // namespace mop::data
