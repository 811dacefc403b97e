#include "data/tokenizer.h"

#include "core/error.h"

namespace mop::data {

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  // Cast through unsigned char so bytes >= 0x80 map to 128..255, not negative ids.
  for (char c : text) ids.push_back(int32_t(static_cast<unsigned char>(c)));
  return ids;
}

std::string ByteTokenizer::decode(std::span<const int32_t> ids) const {
  std::string out;
  out.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    int32_t id = ids[i];
    MOP_CHECK(id >= 0 && id < kByteVocab,
              "decode: token {} at index {} is outside the vocabulary of {}", id, i, kByteVocab);
    if (id < 256) out.push_back(char(uint8_t(id)));
  }
  return out;
}

}  // namespace mop::data
