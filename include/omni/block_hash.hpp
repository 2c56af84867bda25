// Chained hashes of full token blocks, the keys of prefix caching.
//
// Block i of a prompt covers tokens [i*B, (i+1)*B). Its hash covers its parent's hash and its
// own tokens, so equal hashes mean equal prefixes (up to hash collisions). A trailing partial
// block is never hashed, as in vLLM. Two algorithms:
//  - BlockHasher64: a fast 64-bit chain, the simulator's default and the proxy's own key;
//  - sha256 chain: 32-byte digests, like vLLM's sha256 prefix-caching hash, for testing
//    consumers of byte-string hashes.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace omni {

using TokenId = std::uint32_t;
using BlockHash64 = std::uint64_t;
using BlockDigest = std::array<std::uint8_t, 32>;

// The splitmix64 finaliser: full avalanche on 64 bits. The one mixing step behind the block
// hashes, policy tie-breaking, the prefix table and the replayer's random streams.
constexpr std::uint64_t mix64(std::uint64_t x) noexcept {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// Hash of the empty prefix, the parent of block 0.
inline constexpr BlockHash64 kRootBlockHash = 0x9e3779b97f4a7c15ULL;

// Hash of one block given its parent's hash.
BlockHash64 hash_block64(BlockHash64 parent, std::span<const TokenId> tokens) noexcept;

// Hashes of every full block of `tokens`, in order.
std::vector<BlockHash64> hash_blocks64(std::span<const TokenId> tokens, std::size_t block_size,
                                       BlockHash64 root = kRootBlockHash);

// SHA-256 over (parent digest || tokens as little-endian u32).
BlockDigest hash_block_sha256(const BlockDigest& parent, std::span<const TokenId> tokens);
std::vector<BlockDigest> hash_blocks_sha256(std::span<const TokenId> tokens,
                                            std::size_t block_size);

// The 64-bit form of a digest: its last 8 bytes, big-endian, as vLLM converts byte hashes to
// ints for KV events.
BlockHash64 digest_to_u64(const BlockDigest& digest) noexcept;

}  // namespace omni
