#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "data/loader.h"
#include "model/batch.h"
#include "train/config.h"

namespace mop {

struct RunData {
  std::unique_ptr<data::Loader> train, val;  // val may be null (no held-out split)
  std::string description;                   // "built-in corpus: 3800 docs, 1.2M tokens"
  double unigram_entropy = -1;               // nats; < 0 when not computed (large data)
};

// The built-in corpus (data.path empty) or prepared shards. The built-in corpus is fixed
// (its own seed), so train.seed changes the data order, not the data.
RunData make_run_data(const Config& cfg);
// A loader over one file or directory of shards, or a text file (tokenized on the fly).
std::unique_ptr<data::Loader> make_loader_for(const std::string& path, int vocab, int seq_len, uint64_t seed);

// View of a data batch as the model reads it.
TokenBatch token_batch(const data::Batch& b);

}  // namespace mop
