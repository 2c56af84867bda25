#include <omni/block_hash.hpp>

#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <numeric>
#include <stdexcept>
#include <vector>

namespace omni {
namespace {

std::vector<TokenId> iota_tokens(std::size_t n, TokenId first = 1) {
  std::vector<TokenId> v(n);
  std::iota(v.begin(), v.end(), first);
  return v;
}

BlockDigest sha256_of(const std::vector<unsigned char>& bytes) {
  BlockDigest out{};
  unsigned int len = 0;
  EXPECT_EQ(EVP_Digest(bytes.data(), bytes.size(), out.data(), &len, EVP_sha256(), nullptr), 1);
  return out;
}

TEST(BlockHash64, Deterministic) {
  const auto tokens = iota_tokens(64);
  EXPECT_EQ(hash_blocks64(tokens, 16), hash_blocks64(tokens, 16));
  EXPECT_EQ(hash_block64(kRootBlockHash, tokens), hash_block64(kRootBlockHash, tokens));
}

TEST(BlockHash64, ChainsThroughParents) {
  const auto tokens = iota_tokens(48);
  const std::span<const TokenId> all(tokens);
  const auto hashes = hash_blocks64(tokens, 16);
  ASSERT_EQ(hashes.size(), 3u);
  EXPECT_EQ(hashes[0], hash_block64(kRootBlockHash, all.subspan(0, 16)));
  EXPECT_EQ(hashes[1], hash_block64(hashes[0], all.subspan(16, 16)));
  EXPECT_EQ(hashes[2], hash_block64(hashes[1], all.subspan(32, 16)));
}

TEST(BlockHash64, EqualPrefixesGiveEqualHashes) {
  auto a = iota_tokens(64);
  auto b = a;
  b[40] = 999999;  // differs in block 2 only
  const auto ha = hash_blocks64(a, 16);
  const auto hb = hash_blocks64(b, 16);
  ASSERT_EQ(ha.size(), 4u);
  ASSERT_EQ(hb.size(), 4u);
  EXPECT_EQ(ha[0], hb[0]);
  EXPECT_EQ(ha[1], hb[1]);
  EXPECT_NE(ha[2], hb[2]);
  EXPECT_NE(ha[3], hb[3]);  // the chain carries the difference into later blocks
}

TEST(BlockHash64, EarlierTokenChangesEveryLaterHash) {
  const auto a = iota_tokens(16 * 8);
  auto b = a;
  b[0] ^= 1;
  const auto ha = hash_blocks64(a, 16);
  const auto hb = hash_blocks64(b, 16);
  ASSERT_EQ(ha.size(), hb.size());
  for (std::size_t i = 0; i < ha.size(); ++i) EXPECT_NE(ha[i], hb[i]) << "block " << i;
}

TEST(BlockHash64, PartialTrailingBlockIsNotHashed) {
  EXPECT_EQ(hash_blocks64(iota_tokens(47), 16).size(), 2u);
  EXPECT_EQ(hash_blocks64(iota_tokens(48), 16).size(), 3u);
  EXPECT_TRUE(hash_blocks64(iota_tokens(15), 16).empty());
  EXPECT_TRUE(hash_blocks64({}, 16).empty());
  // Appending a partial block leaves the full blocks' hashes unchanged.
  EXPECT_EQ(hash_blocks64(iota_tokens(47), 16), hash_blocks64(iota_tokens(32), 16));
}

TEST(BlockHash64, SensitiveToOrderPositionAndRoot) {
  const std::vector<TokenId> ab = {1, 2, 3, 4};
  const std::vector<TokenId> ba = {2, 1, 3, 4};
  EXPECT_NE(hash_block64(kRootBlockHash, ab), hash_block64(kRootBlockHash, ba));
  EXPECT_NE(hash_blocks64(ab, 2, 1), hash_blocks64(ab, 2, 2));
  EXPECT_EQ(hash_blocks64(ab, 2).front(), hash_blocks64(ab, 2, kRootBlockHash).front());
  // Block size is part of the key: one block of 4 differs from the second block of 2+2.
  EXPECT_NE(hash_blocks64(ab, 4).back(), hash_blocks64(ab, 2).back());
}

TEST(BlockHash64, ZeroBlockSizeThrows) {
  EXPECT_THROW(hash_blocks64(iota_tokens(4), 0), std::invalid_argument);
  EXPECT_THROW(hash_blocks_sha256(iota_tokens(4), 0), std::invalid_argument);
}

TEST(BlockHashSha256, MatchesDefinition) {
  // Block 0: SHA-256(32 zero bytes || tokens as little-endian u32).
  const std::vector<TokenId> tokens = {1, 0x01020304};
  std::vector<unsigned char> bytes(32, 0);
  for (unsigned char b : {1, 0, 0, 0, 4, 3, 2, 1}) bytes.push_back(b);
  const BlockDigest expected0 = sha256_of(bytes);
  const auto digests = hash_blocks_sha256(tokens, 2);
  ASSERT_EQ(digests.size(), 1u);
  EXPECT_EQ(digests[0], expected0);
  EXPECT_EQ(hash_block_sha256(BlockDigest{}, tokens), expected0);
}

TEST(BlockHashSha256, DeterministicChain) {
  const auto tokens = iota_tokens(40);
  const std::span<const TokenId> all(tokens);
  const auto d = hash_blocks_sha256(tokens, 16);
  EXPECT_EQ(d, hash_blocks_sha256(tokens, 16));
  ASSERT_EQ(d.size(), 2u);  // 8 trailing tokens are not hashed
  EXPECT_EQ(d[1], hash_block_sha256(d[0], all.subspan(16, 16)));
  auto other = tokens;
  other[3] += 1;
  const auto e = hash_blocks_sha256(other, 16);
  EXPECT_NE(d[0], e[0]);
  EXPECT_NE(d[1], e[1]);
}

TEST(BlockHashSha256, DigestToU64IsLastEightBytesBigEndian) {
  BlockDigest d{};
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = static_cast<std::uint8_t>(i);
  EXPECT_EQ(digest_to_u64(d), 0x18191a1b1c1d1e1fULL);
  d.fill(0xff);
  EXPECT_EQ(digest_to_u64(d), ~0ULL);
  d[0] = 0;  // leading bytes do not matter
  EXPECT_EQ(digest_to_u64(d), ~0ULL);
  EXPECT_EQ(digest_to_u64(BlockDigest{}), 0u);
}

}  // namespace
}  // namespace omni
