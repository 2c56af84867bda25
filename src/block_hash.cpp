#include <omni/block_hash.hpp>

#include <openssl/evp.h>

#include <stdexcept>

namespace omni {
namespace {

constexpr std::uint64_t kMul1 = 0xbf58476d1ce4e5b9ULL;
constexpr std::uint64_t kMul2 = 0x94d049bb133111ebULL;
constexpr std::uint64_t kPrime = 0x9fb21c651e98df25ULL;

}  // namespace

BlockHash64 hash_block64(BlockHash64 parent, std::span<const TokenId> tokens) noexcept {
  std::uint64_t h = mix64(parent ^ (static_cast<std::uint64_t>(tokens.size()) * kPrime));
  std::size_t i = 0;
  for (; i + 1 < tokens.size(); i += 2) {
    std::uint64_t word = (static_cast<std::uint64_t>(tokens[i]) << 32) | tokens[i + 1];
    h = mix64(h ^ (word * kPrime)) + kMul2;
  }
  if (i < tokens.size()) h = mix64(h ^ (static_cast<std::uint64_t>(tokens[i]) * kPrime)) + kMul1;
  return mix64(h);
}

std::vector<BlockHash64> hash_blocks64(std::span<const TokenId> tokens, std::size_t block_size,
                                       BlockHash64 root) {
  if (block_size == 0) throw std::invalid_argument("block_size must be positive");
  std::vector<BlockHash64> out;
  out.reserve(tokens.size() / block_size);
  BlockHash64 parent = root;
  for (std::size_t start = 0; start + block_size <= tokens.size(); start += block_size) {
    parent = hash_block64(parent, tokens.subspan(start, block_size));
    out.push_back(parent);
  }
  return out;
}

BlockDigest hash_block_sha256(const BlockDigest& parent, std::span<const TokenId> tokens) {
  std::vector<unsigned char> buf;
  buf.reserve(parent.size() + tokens.size() * 4);
  buf.insert(buf.end(), parent.begin(), parent.end());
  for (TokenId t : tokens) {
    for (int b = 0; b < 4; ++b) buf.push_back(static_cast<unsigned char>(t >> (8 * b)));
  }
  BlockDigest out{};
  unsigned int len = 0;
  if (EVP_Digest(buf.data(), buf.size(), out.data(), &len, EVP_sha256(), nullptr) != 1 ||
      len != out.size()) {
    throw std::runtime_error("sha256 failed");
  }
  return out;
}

std::vector<BlockDigest> hash_blocks_sha256(std::span<const TokenId> tokens,
                                            std::size_t block_size) {
  if (block_size == 0) throw std::invalid_argument("block_size must be positive");
  std::vector<BlockDigest> out;
  BlockDigest parent{};  // the root is all zeroes
  for (std::size_t start = 0; start + block_size <= tokens.size(); start += block_size) {
    parent = hash_block_sha256(parent, tokens.subspan(start, block_size));
    out.push_back(parent);
  }
  return out;
}

BlockHash64 digest_to_u64(const BlockDigest& digest) noexcept {
  std::uint64_t v = 0;
  for (std::size_t i = digest.size() - 8; i < digest.size(); ++i) v = (v << 8) | digest[i];
  return v;
}

}  // namespace omni
