#include "train/data_setup.h"

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "core/rng.h"
#include "core/strings.h"
#include "data/corpus.h"
#include "data/prepare.h"

namespace fs = std::filesystem;

namespace mop {

namespace {
constexpr uint64_t kBuiltinCorpusSeed = 1;

bool has_prefix_shards(const fs::path& dir, const std::string& prefix) {
  if (!fs::is_directory(dir)) return false;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    if (n.rfind(prefix, 0) == 0 && e.path().extension() == ".bin") return true;
  }
  return false;
}

bool is_shard_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  char magic[8] = {};
  f.read(magic, 8);
  return f.gcount() == 8 && std::string(magic, 8) == "MOPTOKS1";
}
}  // namespace

TokenBatch token_batch(const data::Batch& b) {
  TokenBatch t;
  t.N = int(b.inputs.size());
  t.tokens = b.inputs.data();
  t.targets = b.targets.data();
  t.positions = b.positions.data();
  t.cu_seqlens = b.cu_seqlens.data();
  t.n_docs = int(b.cu_seqlens.size()) - 1;
  return t;
}

std::unique_ptr<data::Loader> make_loader_for(const std::string& path, int vocab, int seq_len, uint64_t seed) {
  MOP_CHECK(fs::exists(path), "data path '{}' does not exist", path);
  if (fs::is_directory(path)) {
    std::string prefix = has_prefix_shards(path, "train_") ? "train_" : "";
    return std::make_unique<data::Loader>(data::TokenStream::from_dir(path, prefix, vocab), seq_len, seed);
  }
  if (is_shard_file(path))
    return std::make_unique<data::Loader>(data::TokenStream::from_files({path}, vocab), seq_len, seed);
  // Plain text: documents at blank lines, tokenized with the byte tokenizer.
  std::ifstream f(path, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(f)), {});
  auto tokens = data::tokenize_documents(data::split_documents(text));
  return std::make_unique<data::Loader>(data::TokenStream::from_tokens(std::move(tokens), vocab), seq_len, seed);
}

RunData make_run_data(const Config& cfg) {
  RunData d;
  const int vocab = int(cfg.model.vocab_size), T = int(cfg.train.seq_len);
  const uint64_t seed = cfg.train.seed;
  if (cfg.data.synthetic) {
    // Enough windows for every step without wrapping, from the run's seed.
    const uint64_t n = uint64_t(cfg.train.seq_len) * uint64_t(cfg.train.batch) * uint64_t(cfg.train.grad_accum) *
                           uint64_t(cfg.train.steps + 1) + 1;
    Rng rng(hash_seed(seed, "synthetic"));
    std::vector<int32_t> tokens(n);
    for (auto& t : tokens) t = int32_t(rng.below(uint64_t(vocab)));
    d.description = fmt::format("synthetic: {} uniformly random tokens", human_count(double(n)));
    d.train = std::make_unique<data::Loader>(data::TokenStream::from_tokens(std::move(tokens), vocab), T, seed,
                                             /*bos=*/-1);
    return d;
  }
  if (cfg.data.path.empty()) {
    auto docs = data::builtin_corpus(int(cfg.data.builtin_docs), kBuiltinCorpusSeed);
    // The last 5% of the documents are held out.
    size_t n_val = std::max<size_t>(1, docs.size() / 20);
    std::vector<std::string> val_docs(docs.end() - long(n_val), docs.end());
    docs.resize(docs.size() - n_val);
    auto train = data::tokenize_documents(docs);
    auto val = data::tokenize_documents(val_docs);
    d.unigram_entropy = data::unigram_entropy_nats(train, vocab);
    d.description = fmt::format("built-in corpus: {} train docs ({} tokens), {} held-out docs ({} tokens)",
                                docs.size(), human_count(double(train.size())), n_val, human_count(double(val.size())));
    d.train = std::make_unique<data::Loader>(data::TokenStream::from_tokens(std::move(train), vocab), T, seed);
    d.val = std::make_unique<data::Loader>(data::TokenStream::from_tokens(std::move(val), vocab), T, seed);
    return d;
  }
  d.train = make_loader_for(cfg.data.path, vocab, T, seed);
  std::string val_path = cfg.data.val_path;
  if (val_path.empty() && fs::is_directory(cfg.data.path) && has_prefix_shards(cfg.data.path, "val_")) {
    d.val = std::make_unique<data::Loader>(data::TokenStream::from_dir(cfg.data.path, "val_", vocab), T, seed);
  } else if (!val_path.empty()) {
    d.val = make_loader_for(val_path, vocab, T, seed);
  }
  d.description = fmt::format("{}: {} train tokens{}", cfg.data.path, human_count(double(d.train->num_tokens())),
                              d.val ? fmt::format(", {} held-out tokens", human_count(double(d.val->num_tokens())))
                                    : std::string(", no held-out split"));
  return d;
}

}  // namespace mop
