// Byte-level tokenizer: every byte is its own token, plus three specials. Byte-level keeps
// the pipeline free of any learned vocabulary file, so any text can be trained on and the
// vocabulary is known at compile time.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace mop::data {

inline constexpr int32_t kBos = 256;        // begins a document
inline constexpr int32_t kEos = 257;        // ends a document
inline constexpr int32_t kPad = 258;        // fills unused slots (never produced by encode)
inline constexpr int32_t kByteVocab = 259;  // 256 bytes + BOS + EOS + PAD

class ByteTokenizer {
 public:
  int vocab_size() const { return kByteVocab; }
  // Bytes only: callers add BOS/EOS themselves so encode stays a pure byte map.
  std::vector<int32_t> encode(std::string_view text) const;
  // Specials are skipped (they carry no text); ids outside [0, 259) throw mop::Error.
  std::string decode(std::span<const int32_t> ids) const;
};

}  // namespace mop::data
