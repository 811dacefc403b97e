#include "data/prepare.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/rng.h"
#include "data/shard.h"
#include "data/tokenizer.h"

namespace mop::data {

namespace fs = std::filesystem;

namespace {

std::string read_file(const std::string& path) {
  std::error_code ec;
  MOP_CHECK(fs::is_regular_file(path, ec), "prepare: input file {} does not exist or is not a "
            "regular file", path);
  std::ifstream in(path, std::ios::binary);
  MOP_CHECK(in, "prepare: cannot open input file {}: {}", path, std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  MOP_CHECK(!in.bad(), "prepare: error reading input file {}", path);
  return ss.str();
}

bool is_blank(std::string_view line) {
  // '\r' counts as whitespace so CRLF files split the same way as LF files.
  return line.find_first_not_of(" \t\r\f\v") == std::string_view::npos;
}

// True for the names prepare_shards writes: (train|val)_ + at least 6 digits + .bin, or
// the .bin.tmp of an interrupted write.
bool is_shard_name(std::string_view name) {
  for (std::string_view prefix : {"train_", "val_"}) {
    if (!name.starts_with(prefix)) continue;
    std::string_view rest = name.substr(prefix.size());
    size_t digits = 0;
    while (digits < rest.size() && rest[digits] >= '0' && rest[digits] <= '9') ++digits;
    rest = rest.substr(digits);
    return digits >= 6 && (rest == ".bin" || rest == ".bin.tmp");
  }
  return false;
}

// Appends documents to one shard at a time and writes each shard when the next document
// would push it past the limit.
class ShardWriter {
 public:
  ShardWriter(std::string dir, std::string prefix, size_t limit)
      : dir_(std::move(dir)), prefix_(std::move(prefix)), limit_(limit) {}
  void add(const std::vector<int32_t>& doc) {
    if (!buf_.empty() && buf_.size() + doc.size() > limit_) flush();
    buf_.insert(buf_.end(), doc.begin(), doc.end());
  }
  void flush() {
    if (buf_.empty()) return;
    write_shard((fs::path(dir_) / fmt::format("{}_{:06d}.bin", prefix_, shards_)).string(),
                buf_);
    ++shards_;
    buf_.clear();
  }
  uint64_t shards() const { return shards_; }

 private:
  std::string dir_, prefix_;
  size_t limit_;
  std::vector<int32_t> buf_;
  uint64_t shards_ = 0;
};

}  // namespace

std::vector<int32_t> tokenize_documents(const std::vector<std::string>& docs) {
  size_t total = 0;
  for (const auto& d : docs) total += d.size() + 2;
  std::vector<int32_t> out;
  out.reserve(total);
  for (const auto& d : docs) {
    out.push_back(kBos);
    // Same byte map as ByteTokenizer::encode, appended in place to avoid a copy per doc.
    for (char c : d) out.push_back(int32_t(static_cast<unsigned char>(c)));
    out.push_back(kEos);
  }
  return out;
}

std::vector<std::string> split_documents(const std::string& text) {
  std::vector<std::string> docs;
  std::string cur;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string_view line(text.data() + pos, nl - pos);
    if (is_blank(line)) {
      if (!cur.empty()) docs.push_back(std::move(cur));
      cur.clear();
    } else {
      if (!cur.empty()) cur.push_back('\n');
      cur.append(line);
    }
    pos = nl + 1;
  }
  if (!cur.empty()) docs.push_back(std::move(cur));
  return docs;
}

PrepareStats prepare_shards(const std::vector<std::string>& input_files,
                            const std::string& out_dir, double val_fraction, uint64_t seed,
                            size_t shard_tokens) {
  MOP_CHECK(val_fraction >= 0.0 && val_fraction <= 1.0,
            "prepare: val_fraction must be in [0, 1], got {}", val_fraction);
  MOP_CHECK(shard_tokens > 0, "prepare: shard_tokens must be > 0");
  MOP_CHECK(!input_files.empty(), "prepare: no input files given");

  // Pass 1: read and tokenize everything, so a bad input fails before out_dir is touched.
  std::vector<std::vector<int32_t>> docs;  // each BOS + bytes + EOS
  for (size_t f = 0; f < input_files.size(); ++f) {
    std::vector<std::string> texts = split_documents(read_file(input_files[f]));
    for (size_t i = 0; i < texts.size(); ++i) {
      std::vector<int32_t> d = tokenize_documents({texts[i]});
      MOP_CHECK(d.size() <= shard_tokens,
                "prepare: document {} of {} has {} tokens (BOS and EOS included), more than "
                "shard_tokens = {}; documents are not split across shards, so raise "
                "shard_tokens",
                i, input_files[f], d.size(), shard_tokens);
      docs.push_back(std::move(d));
    }
  }
  MOP_CHECK(!docs.empty(), "prepare: the {} input file(s) hold no documents (only blank lines)",
            input_files.size());

  // Pass 2: the split. One draw per document in input order, from a stream tagged for this
  // purpose, so the same inputs and seed always give the same split.
  Rng rng(hash_seed(seed, "mop.data.prepare.val_split"));
  std::vector<char> is_val(docs.size(), 0);
  size_t n_val = 0;
  for (size_t i = 0; i < docs.size(); ++i) {
    is_val[i] = rng.uniform() < val_fraction;
    n_val += is_val[i];
  }
  // Small corpora can draw an empty split by chance; an empty val set would make
  // validation silently meaningless, an empty train set would make training impossible.
  if (docs.size() >= 2 && val_fraction > 0.0 && n_val == 0) {
    is_val[rng.below(docs.size())] = 1;
    n_val = 1;
  }
  if (val_fraction < 1.0 && n_val == docs.size()) {
    is_val[rng.below(docs.size())] = 0;
    --n_val;
  }

  // Pass 3: write. Stale shards from an earlier run would be picked up by the loader's
  // prefix scan, so only files with exactly our naming pattern are removed.
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  MOP_CHECK(!ec && fs::is_directory(out_dir), "prepare: cannot create output directory {}: {}",
            out_dir, ec.message());
  // error_code overloads throughout: library errors must surface as mop::Error.
  for (fs::directory_iterator it(out_dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code fec;
    if (it->is_regular_file(fec) && is_shard_name(it->path().filename().string())) {
      fs::remove(it->path(), fec);
      MOP_CHECK(!fec, "prepare: cannot remove stale shard {}: {}", it->path().string(),
                fec.message());
    }
  }
  MOP_CHECK(!ec, "prepare: cannot list output directory {}: {}", out_dir, ec.message());

  PrepareStats st;
  ShardWriter train(out_dir, "train", shard_tokens);
  ShardWriter val(out_dir, "val", SIZE_MAX);  // val is one shard, whatever its size
  for (size_t i = 0; i < docs.size(); ++i) {
    const auto& t = docs[i];
    st.docs += 1;
    st.tokens += t.size();
    if (is_val[i]) {
      st.val_docs += 1;
      st.val_tokens += t.size();
      val.add(t);
    } else {
      st.train_docs += 1;
      st.train_tokens += t.size();
      train.add(t);
    }
  }
  train.flush();
  val.flush();
  st.train_shards = train.shards();
  st.val_shards = val.shards();
  return st;
}

}  // namespace mop::data
