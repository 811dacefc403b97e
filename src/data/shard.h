// Token shard files: a 32-byte header followed by the raw token array, so a shard can be
// memory-mapped and read in place, without parsing, however large it is.
//
// Layout (little-endian):
//   offset  0: char[8]  magic "MOPTOKS1"
//   offset  8: uint32   version (1)
//   offset 12: uint32   dtype (1 = uint16, 2 = uint32)
//   offset 16: uint64   token count
//   offset 24: uint64   reserved (0)
//   offset 32: count tokens of the dtype's width
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mop::data {

inline constexpr size_t kShardHeaderBytes = 32;
inline constexpr char kShardMagic[9] = "MOPTOKS1";
inline constexpr uint32_t kShardVersion = 1;
inline constexpr uint32_t kShardDtypeU16 = 1;
inline constexpr uint32_t kShardDtypeU32 = 2;

// Writes tokens as a shard, as uint16 when every token fits (halves the disk and page-cache
// footprint for small vocabularies) and uint32 otherwise. Negative tokens throw. The file
// is written to path + ".tmp" and renamed over path, so a reader never sees a half file.
void write_shard(const std::string& path, const std::vector<int32_t>& tokens);

// A read-only memory map of one shard. The constructor validates the header and the file
// size against the token count, so a truncated or padded file fails at open, with the
// numbers, instead of yielding garbage tokens later.
class ShardView {
 public:
  explicit ShardView(std::string path);
  ~ShardView();
  ShardView(ShardView&& o) noexcept;
  ShardView& operator=(ShardView&& o) noexcept;
  ShardView(const ShardView&) = delete;
  ShardView& operator=(const ShardView&) = delete;

  const std::string& path() const { return path_; }
  uint64_t size() const { return count_; }  // number of tokens
  uint32_t dtype() const { return dtype_; }
  size_t elem_size() const { return elem_size_; }

  // Token i (bounds-checked; throws mop::Error naming the file when i >= size()).
  int32_t token(uint64_t i) const;
  // Copies tokens [begin, begin + n) to out, widening uint16 to int32.
  void read(uint64_t begin, uint64_t n, int32_t* out) const;
  // Throws on the first token >= vocab_size, giving its token index and byte offset, so
  // a shard prepared for a bigger vocabulary cannot silently index past the embedding.
  void validate_vocab(int vocab_size) const;

 private:
  void unmap() noexcept;

  std::string path_;
  void* map_ = nullptr;  // whole file, header included
  size_t map_bytes_ = 0;
  uint64_t count_ = 0;
  uint32_t dtype_ = 0;
  size_t elem_size_ = 0;
};

}  // namespace mop::data
