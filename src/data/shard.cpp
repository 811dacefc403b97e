#include "data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>

#include "core/error.h"

namespace mop::data {

// The format is little-endian and we copy integers with memcpy; a big-endian host would
// need byte swaps, which nobody needs yet.
static_assert(std::endian::native == std::endian::little, "shard I/O assumes little-endian");

namespace {

template <class T>
void put(unsigned char* dst, T v) {
  std::memcpy(dst, &v, sizeof v);
}
template <class T>
T get(const unsigned char* src) {
  T v;
  std::memcpy(&v, src, sizeof v);
  return v;
}

// Printable rendering of the 8 magic bytes for error messages (binary junk as \xNN).
std::string show_bytes(const unsigned char* p, size_t n) {
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    if (p[i] >= 0x20 && p[i] < 0x7f && p[i] != '"' && p[i] != '\\')
      s.push_back(char(p[i]));
    else
      s += fmt::format("\\x{:02x}", p[i]);
  }
  return s;
}

}  // namespace

void write_shard(const std::string& path, const std::vector<int32_t>& tokens) {
  int32_t max_tok = 0;
  for (size_t i = 0; i < tokens.size(); ++i) {
    MOP_CHECK(tokens[i] >= 0, "write_shard {}: token {} at index {} is negative", path,
              tokens[i], i);
    max_tok = std::max(max_tok, tokens[i]);
  }
  const bool narrow = max_tok < 65536;
  const size_t es = narrow ? 2 : 4;

  unsigned char header[kShardHeaderBytes] = {};
  std::memcpy(header, kShardMagic, 8);
  put<uint32_t>(header + 8, kShardVersion);
  put<uint32_t>(header + 12, narrow ? kShardDtypeU16 : kShardDtypeU32);
  put<uint64_t>(header + 16, uint64_t(tokens.size()));
  put<uint64_t>(header + 24, 0);

  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  MOP_CHECK(f, "write_shard: cannot create {}: {}", tmp, std::strerror(errno));
  bool ok = std::fwrite(header, 1, sizeof header, f) == sizeof header;
  if (narrow) {
    // Convert in chunks so a huge shard does not need a second full-size copy.
    std::vector<uint16_t> buf;
    for (size_t i = 0; ok && i < tokens.size(); i += 1 << 16) {
      size_t n = std::min<size_t>(1 << 16, tokens.size() - i);
      buf.assign(tokens.begin() + i, tokens.begin() + i + n);
      ok = std::fwrite(buf.data(), es, n, f) == n;
    }
  } else if (!tokens.empty()) {
    ok = ok && std::fwrite(tokens.data(), es, tokens.size(), f) == tokens.size();
  }
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    MOP_FAIL("write_shard: writing {} ({} tokens of {} bytes) failed: {}", tmp, tokens.size(),
             es, std::strerror(errno));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  MOP_CHECK(!ec, "write_shard: cannot rename {} to {}: {}", tmp, path, ec.message());
}

ShardView::ShardView(std::string path) : path_(std::move(path)) {
  int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  MOP_CHECK(fd >= 0, "shard file {}: cannot open: {}", path_, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    MOP_FAIL("shard file {}: cannot stat: {}", path_, std::strerror(e));
  }
  const uint64_t file_bytes = uint64_t(st.st_size);
  if (file_bytes < kShardHeaderBytes) {
    ::close(fd);
    MOP_FAIL("shard file {}: file is {} bytes, shorter than the {}-byte header", path_,
             file_bytes, kShardHeaderBytes);
  }
  void* m = ::mmap(nullptr, size_t(file_bytes), PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);  // the mapping keeps the file alive; the descriptor is not needed
  MOP_CHECK(m != MAP_FAILED, "shard file {}: mmap of {} bytes failed: {}", path_, file_bytes,
            std::strerror(map_errno));
  map_ = m;
  map_bytes_ = size_t(file_bytes);

  // From here on a failed check must unmap: the destructor does not run for a throwing
  // constructor.
  try {
    const auto* h = static_cast<const unsigned char*>(map_);
    MOP_CHECK(std::memcmp(h, kShardMagic, 8) == 0,
              "shard file {}: wrong magic \"{}\" in the first 8 bytes, expected \"{}\" (not a "
              "mop token shard)",
              path_, show_bytes(h, 8), kShardMagic);
    const uint32_t version = get<uint32_t>(h + 8);
    MOP_CHECK(version == kShardVersion,
              "shard file {}: unknown version {} at byte offset 8, this build reads version {}",
              path_, version, kShardVersion);
    dtype_ = get<uint32_t>(h + 12);
    MOP_CHECK(dtype_ == kShardDtypeU16 || dtype_ == kShardDtypeU32,
              "shard file {}: unknown dtype {} at byte offset 12, expected {} (uint16) or {} "
              "(uint32)",
              path_, dtype_, kShardDtypeU16, kShardDtypeU32);
    elem_size_ = dtype_ == kShardDtypeU16 ? 2 : 4;
    count_ = get<uint64_t>(h + 16);
    // A corrupt count can be so large that count * elem_size overflows; compare by
    // division first so the message below never shows a wrapped number.
    const uint64_t max_count =
        (std::numeric_limits<uint64_t>::max() - kShardHeaderBytes) / elem_size_;
    MOP_CHECK(count_ <= max_count,
              "shard file {}: header claims {} tokens of {} bytes, which no file can hold; "
              "the file is {} bytes",
              path_, count_, elem_size_, file_bytes);
    const uint64_t expected = kShardHeaderBytes + count_ * elem_size_;
    if (file_bytes < expected) {
      MOP_FAIL("shard file {}: truncated: header says {} tokens of {} bytes, so the data "
               "should end at byte offset {} (expected {} bytes) but the file is {} bytes "
               "({} bytes missing)",
               path_, count_, elem_size_, expected, expected, file_bytes,
               expected - file_bytes);
    }
    if (file_bytes > expected) {
      MOP_FAIL("shard file {}: {} trailing bytes: header says {} tokens of {} bytes, so the "
               "data should end at byte offset {} (expected {} bytes) but the file is {} bytes",
               path_, file_bytes - expected, count_, elem_size_, expected, expected,
               file_bytes);
    }
  } catch (...) {
    unmap();
    throw;
  }
}

ShardView::~ShardView() { unmap(); }

ShardView::ShardView(ShardView&& o) noexcept
    : path_(std::move(o.path_)),
      map_(o.map_),
      map_bytes_(o.map_bytes_),
      count_(o.count_),
      dtype_(o.dtype_),
      elem_size_(o.elem_size_) {
  o.map_ = nullptr;
  o.map_bytes_ = 0;
  o.count_ = 0;
}

ShardView& ShardView::operator=(ShardView&& o) noexcept {
  if (this != &o) {
    unmap();
    path_ = std::move(o.path_);
    map_ = o.map_;
    map_bytes_ = o.map_bytes_;
    count_ = o.count_;
    dtype_ = o.dtype_;
    elem_size_ = o.elem_size_;
    o.map_ = nullptr;
    o.map_bytes_ = 0;
    o.count_ = 0;
  }
  return *this;
}

void ShardView::unmap() noexcept {
  if (map_) ::munmap(map_, map_bytes_);
  map_ = nullptr;
  map_bytes_ = 0;
}

int32_t ShardView::token(uint64_t i) const {
  MOP_CHECK(i < count_, "shard file {}: token index {} out of range (the shard has {} tokens)",
            path_, i, count_);
  const auto* data = static_cast<const unsigned char*>(map_) + kShardHeaderBytes;
  return dtype_ == kShardDtypeU16 ? int32_t(get<uint16_t>(data + i * 2))
                                  : int32_t(get<uint32_t>(data + i * 4));
}

void ShardView::read(uint64_t begin, uint64_t n, int32_t* out) const {
  MOP_CHECK(begin <= count_ && n <= count_ - begin,
            "shard file {}: read of tokens [{}, {}) is out of range (the shard has {} tokens)",
            path_, begin, begin + n, count_);
  const auto* data = static_cast<const unsigned char*>(map_) + kShardHeaderBytes;
  if (dtype_ == kShardDtypeU16) {
    for (uint64_t i = 0; i < n; ++i) out[i] = int32_t(get<uint16_t>(data + (begin + i) * 2));
  } else {
    // uint32 tokens < 2^31 are bit-identical as int32; larger ones fail validate_vocab.
    std::memcpy(out, data + begin * 4, n * 4);
  }
}

void ShardView::validate_vocab(int vocab_size) const {
  const auto* data = static_cast<const unsigned char*>(map_) + kShardHeaderBytes;
  const uint64_t vocab = uint64_t(std::max(vocab_size, 0));
  for (uint64_t i = 0; i < count_; ++i) {
    uint64_t t = dtype_ == kShardDtypeU16 ? get<uint16_t>(data + i * 2)
                                          : get<uint32_t>(data + i * 4);
    if (t >= vocab) [[unlikely]] {
      MOP_FAIL("shard file {}: token {} at token index {} (byte offset {}) is outside the "
               "vocabulary of {}",
               path_, t, i, kShardHeaderBytes + i * elem_size_, vocab_size);
    }
  }
}

}  // namespace mop::data
