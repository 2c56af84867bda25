#include <omni/kv_events.hpp>

#include <gtest/gtest.h>
#include <msgpack.hpp>

#include <chrono>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

namespace omni::kv {
namespace {

using Packer = msgpack::packer<msgpack::sbuffer>;

std::string bytes_of(const msgpack::sbuffer& buf) { return {buf.data(), buf.size()}; }

void pack_str(Packer& pk, std::string_view s) {
  pk.pack_str(static_cast<std::uint32_t>(s.size()));
  pk.pack_str_body(s.data(), static_cast<std::uint32_t>(s.size()));
}

void pack_bin(Packer& pk, std::string_view s) {
  pk.pack_bin(static_cast<std::uint32_t>(s.size()));
  pk.pack_bin_body(s.data(), static_cast<std::uint32_t>(s.size()));
}

std::string digest_like(char fill) { return std::string(32, fill); }

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

enum class HashKind { kInt, kBytes };

ExternalHash make_hash(HashKind kind, int i) {
  if (kind == HashKind::kInt) {
    // High bit set on odd i, to cover the full unsigned range.
    return ExternalHash::from_int((i % 2 ? 0x8000000000000000ULL : 0) + 1000 + i);
  }
  return ExternalHash::from_bytes(digest_like(static_cast<char>('a' + i)));
}

EventBatch sample_batch(HashKind kind, bool with_rank) {
  EventBatch batch;
  batch.ts = 1718000000.123456;
  if (with_rank) batch.data_parallel_rank = 3;

  BlockStored root_chain;  // parent null, no LoRA, medium set
  root_chain.block_hashes = {make_hash(kind, 0), make_hash(kind, 1)};
  root_chain.token_ids = {1, 2, 3, 4, 5, 6, 7, 0xFFFFFFFFu};
  root_chain.block_size = 4;
  root_chain.medium = "GPU";
  batch.events.emplace_back(root_chain);

  BlockStored child;  // parent set, LoRA set, no medium, lora_name set
  child.block_hashes = {make_hash(kind, 2)};
  child.parent_block_hash = make_hash(kind, 1);
  child.token_ids = {9, 10, 11, 12};
  child.block_size = 4;
  child.lora_id = 7;
  child.lora_name = "adapter-a";
  batch.events.emplace_back(child);

  BlockStored bare;  // every optional empty
  bare.block_hashes = {make_hash(kind, 3)};
  bare.parent_block_hash = make_hash(kind, 2);
  bare.token_ids = {13, 14, 15, 16};
  bare.block_size = 4;
  batch.events.emplace_back(bare);

  batch.events.emplace_back(BlockRemoved{{make_hash(kind, 0), make_hash(kind, 1)}, "GPU"});
  batch.events.emplace_back(BlockRemoved{{make_hash(kind, 2)}, std::nullopt});
  batch.events.emplace_back(AllBlocksCleared{});
  return batch;
}

using RoundTripParam = std::tuple<EventEncoding, EventLayout, HashKind, bool>;

class RoundTripTest : public ::testing::TestWithParam<RoundTripParam> {};

TEST_P(RoundTripTest, DecodesWhatWasEncoded) {
  const auto [encoding, layout, kind, with_rank] = GetParam();
  const EventBatch batch = sample_batch(kind, with_rank);
  const std::string payload = encode_batch(batch, {encoding, layout});

  EventBatch expected = batch;
  if (encoding == EventEncoding::kArray && layout == EventLayout::kSglang) {
    // SGLang's positional BlockStored has no lora_name.
    for (Event& ev : expected.events) {
      if (auto* stored = std::get_if<BlockStored>(&ev)) stored->lora_name.reset();
    }
  }
  std::size_t skipped = 99;
  EXPECT_EQ(decode_batch(payload, &skipped), expected);
  EXPECT_EQ(skipped, 0u);
}

INSTANTIATE_TEST_SUITE_P(
    AllForms, RoundTripTest,
    ::testing::Combine(::testing::Values(EventEncoding::kArray, EventEncoding::kMap),
                       ::testing::Values(EventLayout::kVllm, EventLayout::kSglang),
                       ::testing::Values(HashKind::kInt, HashKind::kBytes), ::testing::Bool()));

// ts stays a float64 even when integral (msgpack-cxx would pack 2.0 as the int 2).
TEST(KvEventsEncode, BatchIsPositionalArrayWithFloatTsAndNilRank) {
  EventBatch batch;
  batch.ts = 2.0;
  const std::string payload = encode_batch(batch);
  msgpack::object_handle oh = msgpack::unpack(payload.data(), payload.size());
  const msgpack::object& root = oh.get();
  ASSERT_EQ(root.type, msgpack::type::ARRAY);
  ASSERT_EQ(root.via.array.size, 3u);
  EXPECT_EQ(root.via.array.ptr[0].type, msgpack::type::FLOAT64);
  EXPECT_EQ(root.via.array.ptr[0].via.f64, 2.0);
  EXPECT_EQ(root.via.array.ptr[1].type, msgpack::type::ARRAY);
  EXPECT_EQ(root.via.array.ptr[2].type, msgpack::type::NIL);
}

// Field counts of each layout, which consumers built on msgspec check.
TEST(KvEventsEncode, ArrayLayoutsHaveTheDocumentedLengths) {
  BlockStored stored{{ExternalHash::from_int(1)}, std::nullopt, {1, 2}, 2, std::nullopt,
                     std::nullopt, std::nullopt};
  BlockStored stored_gpu = stored;
  stored_gpu.medium = "GPU";
  EventBatch batch{0.0,
                   {stored, stored_gpu, BlockRemoved{{ExternalHash::from_int(1)}, std::nullopt},
                    BlockRemoved{{ExternalHash::from_int(1)}, "CPU"}, AllBlocksCleared{}},
                   std::nullopt};
  auto lengths = [&](EventLayout layout) {
    const std::string payload = encode_batch(batch, {EventEncoding::kArray, layout});
    msgpack::object_handle oh = msgpack::unpack(payload.data(), payload.size());
    const msgpack::object& events = oh.get().via.array.ptr[1];
    std::vector<std::uint32_t> out;
    for (std::uint32_t i = 0; i < events.via.array.size; ++i) {
      out.push_back(events.via.array.ptr[i].via.array.size);
    }
    return out;
  };
  EXPECT_EQ(lengths(EventLayout::kVllm), (std::vector<std::uint32_t>{8, 8, 3, 3, 1}));
  EXPECT_EQ(lengths(EventLayout::kSglang), (std::vector<std::uint32_t>{6, 7, 2, 3, 1}));
}

TEST(KvEventsEncode, MapFormOmitsEmptyOptionalsExceptVllmParentAndLora) {
  BlockStored stored{{ExternalHash::from_int(1)}, std::nullopt, {1, 2}, 2, std::nullopt,
                     std::nullopt, std::nullopt};
  EventBatch batch{0.0, {stored}, std::nullopt};
  auto keys = [&](EventLayout layout) {
    const std::string payload = encode_batch(batch, {EventEncoding::kMap, layout});
    msgpack::object_handle oh = msgpack::unpack(payload.data(), payload.size());
    const msgpack::object& ev = oh.get().via.array.ptr[1].via.array.ptr[0];
    EXPECT_EQ(ev.type, msgpack::type::MAP);
    std::vector<std::string> out;
    for (std::uint32_t i = 0; i < ev.via.map.size; ++i) {
      out.push_back(ev.via.map.ptr[i].key.as<std::string>());
    }
    return out;
  };
  EXPECT_EQ(keys(EventLayout::kVllm),
            (std::vector<std::string>{"type", "block_hashes", "parent_block_hash", "token_ids",
                                      "block_size", "lora_id"}));
  EXPECT_EQ(keys(EventLayout::kSglang),
            (std::vector<std::string>{"type", "block_hashes", "token_ids", "block_size"}));
}

TEST(KvEventsEncode, IntHashesArePositiveIntsAndBytesAreBin) {
  EventBatch batch{0.0,
                   {BlockRemoved{{ExternalHash::from_int(~0ULL), ExternalHash::from_bytes("ab")},
                                 std::nullopt}},
                   std::nullopt};
  const std::string payload = encode_batch(batch);
  msgpack::object_handle oh = msgpack::unpack(payload.data(), payload.size());
  const msgpack::object& hashes = oh.get().via.array.ptr[1].via.array.ptr[0].via.array.ptr[1];
  ASSERT_EQ(hashes.via.array.size, 2u);
  EXPECT_EQ(hashes.via.array.ptr[0].type, msgpack::type::POSITIVE_INTEGER);
  EXPECT_EQ(hashes.via.array.ptr[0].via.u64, ~0ULL);
  EXPECT_EQ(hashes.via.array.ptr[1].type, msgpack::type::BIN);
}

// ---------------------------------------------------------------------------------------------
// Hand-built payloads, as engines send them
// ---------------------------------------------------------------------------------------------

// vLLM's map form with fields this decoder does not know, in a map-form batch.
TEST(KvEventsDecode, VllmMapFormWithExtraKeys) {
  msgpack::sbuffer buf;
  Packer pk(buf);
  pk.pack_map(3);
  pack_str(pk, "ts");
  pk.pack_double(12.5);
  pack_str(pk, "events");
  pk.pack_array(2);
  {
    pk.pack_map(11);
    pack_str(pk, "type");
    pack_str(pk, "BlockStored");
    pack_str(pk, "block_hashes");
    pk.pack_array(2);
    pk.pack_uint64(0xFEDCBA9876543210ULL);
    pk.pack_uint64(42);
    pack_str(pk, "parent_block_hash");
    pk.pack_nil();
    pack_str(pk, "token_ids");
    pk.pack_array(4);
    for (int t : {100, 200, 300, 400}) pk.pack_int(t);
    pack_str(pk, "block_size");
    pk.pack_int(2);
    pack_str(pk, "lora_id");
    pk.pack_nil();
    pack_str(pk, "medium");
    pack_str(pk, "GPU");
    pack_str(pk, "lora_name");
    pk.pack_nil();
    pack_str(pk, "extra_keys");
    pk.pack_array(2);
    pk.pack_array(2);
    pack_str(pk, "mm-hash");
    pk.pack_map(1);
    pack_str(pk, "offset");
    pk.pack_int(3);
    pk.pack_nil();
    pack_str(pk, "group_idx");
    pk.pack_int(1);
    pack_str(pk, "kv_cache_spec_kind");
    pack_str(pk, "full_attention");
  }
  {
    pk.pack_map(4);
    pack_str(pk, "group_idx");
    pk.pack_int(0);
    pack_str(pk, "type");
    pack_str(pk, "BlockRemoved");
    pack_str(pk, "block_hashes");
    pk.pack_array(1);
    pk.pack_uint64(42);
    pack_str(pk, "medium");
    pack_str(pk, "CPU");
  }
  pack_str(pk, "data_parallel_rank");
  pk.pack_int(1);

  std::size_t skipped = 99;
  const EventBatch batch = decode_batch(bytes_of(buf), &skipped);
  EXPECT_EQ(skipped, 0u);
  EXPECT_EQ(batch.ts, 12.5);
  EXPECT_EQ(batch.data_parallel_rank, 1);
  ASSERT_EQ(batch.events.size(), 2u);
  const BlockStored expected_stored{
      {ExternalHash::from_int(0xFEDCBA9876543210ULL), ExternalHash::from_int(42)},
      std::nullopt,
      {100, 200, 300, 400},
      2,
      std::nullopt,
      "GPU",
      std::nullopt};
  EXPECT_EQ(std::get<BlockStored>(batch.events[0]), expected_stored);
  EXPECT_EQ(std::get<BlockRemoved>(batch.events[1]),
            (BlockRemoved{{ExternalHash::from_int(42)}, "CPU"}));
}

// Newer vLLM array form: trailing extra_keys and group_idx after lora_name, and BlockRemoved's
// group_idx after medium.
TEST(KvEventsDecode, VllmArrayFormWithTrailingFields) {
  msgpack::sbuffer buf;
  Packer pk(buf);
  pk.pack_array(3);
  pk.pack_double(1.0);
  pk.pack_array(2);
  pk.pack_array(10);
  pack_str(pk, "BlockStored");
  pk.pack_array(1);
  pack_bin(pk, digest_like('x'));
  pack_bin(pk, digest_like('p'));
  pk.pack_array(2);
  pk.pack_int(5);
  pk.pack_int(6);
  pk.pack_int(2);
  pk.pack_int(4);
  pack_str(pk, "GPU");
  pack_str(pk, "my-lora");
  pk.pack_array(1);
  pk.pack_nil();  // extra_keys
  pk.pack_int(0);  // group_idx
  pk.pack_array(4);
  pack_str(pk, "BlockRemoved");
  pk.pack_array(0);
  pk.pack_nil();
  pk.pack_int(3);  // group_idx
  pk.pack_nil();

  const EventBatch batch = decode_batch(bytes_of(buf));
  EXPECT_EQ(batch.data_parallel_rank, std::nullopt);
  ASSERT_EQ(batch.events.size(), 2u);
  const BlockStored expected{{ExternalHash::from_bytes(digest_like('x'))},
                             ExternalHash::from_bytes(digest_like('p')),
                             {5, 6},
                             2,
                             4,
                             "GPU",
                             "my-lora"};
  EXPECT_EQ(std::get<BlockStored>(batch.events[0]), expected);
  EXPECT_EQ(std::get<BlockRemoved>(batch.events[1]), (BlockRemoved{{}, std::nullopt}));
}

// vLLM 0.8-era BlockStored had no medium: [tag, hashes, parent, tokens, block_size, lora_id].
TEST(KvEventsDecode, OldSixElementBlockStored) {
  msgpack::sbuffer buf;
  Packer pk(buf);
  pk.pack_array(2);  // batches without a rank field
  pk.pack_int(1700000000);  // integral ts
  pk.pack_array(1);
  pk.pack_array(6);
  pack_str(pk, "BlockStored");
  pk.pack_array(1);
  pk.pack_uint64(7);
  pk.pack_uint64(6);
  pk.pack_array(1);
  pk.pack_int(9);
  pk.pack_int(1);
  pk.pack_nil();

  const EventBatch batch = decode_batch(bytes_of(buf));
  EXPECT_EQ(batch.ts, 1700000000.0);
  EXPECT_EQ(batch.data_parallel_rank, std::nullopt);
  ASSERT_EQ(batch.events.size(), 1u);
  const auto& stored = std::get<BlockStored>(batch.events[0]);
  EXPECT_EQ(stored.parent_block_hash, ExternalHash::from_int(6));
  EXPECT_EQ(stored.token_ids, std::vector<std::uint32_t>{9});
  EXPECT_EQ(stored.lora_id, std::nullopt);
  EXPECT_EQ(stored.medium, std::nullopt);
  EXPECT_EQ(stored.lora_name, std::nullopt);
}

// SGLang publishes Python's hash() values: signed 64-bit, often negative.
TEST(KvEventsDecode, NegativeIntHashesKeepTheirBitPattern) {
  msgpack::sbuffer buf;
  Packer pk(buf);
  pk.pack_array(3);
  pk.pack_double(0.5);
  pk.pack_array(2);
  pk.pack_array(7);
  pack_str(pk, "BlockStored");
  pk.pack_array(2);
  pk.pack_int64(-1);
  pk.pack_int64(std::numeric_limits<std::int64_t>::min());
  pk.pack_int64(-5);
  pk.pack_array(0);
  pk.pack_int(16);
  pk.pack_int64(-2);  // lora_id
  pack_str(pk, "GPU");
  pk.pack_array(2);
  pack_str(pk, "BlockRemoved");
  pk.pack_array(1);
  pk.pack_int64(-3);
  pk.pack_int(0);

  const EventBatch batch = decode_batch(bytes_of(buf));
  ASSERT_EQ(batch.events.size(), 2u);
  const auto& stored = std::get<BlockStored>(batch.events[0]);
  EXPECT_EQ(stored.block_hashes,
            (std::vector<ExternalHash>{ExternalHash::from_int(0xFFFFFFFFFFFFFFFFULL),
                                       ExternalHash::from_int(0x8000000000000000ULL)}));
  EXPECT_EQ(stored.parent_block_hash, ExternalHash::from_int(0xFFFFFFFFFFFFFFFBULL));
  EXPECT_EQ(stored.lora_id, -2);
  EXPECT_EQ(stored.medium, "GPU");
  EXPECT_EQ(std::get<BlockRemoved>(batch.events[1]).block_hashes,
            std::vector<ExternalHash>{ExternalHash::from_int(0xFFFFFFFFFFFFFFFDULL)});
  EXPECT_EQ(batch.data_parallel_rank, 0);
}

TEST(KvEventsDecode, StrHashesAreBytes) {
  msgpack::sbuffer buf;
  Packer pk(buf);
  pk.pack_array(2);
  pk.pack_double(0.0);
  pk.pack_array(1);
  pk.pack_array(2);
  pack_str(pk, "BlockRemoved");
  pk.pack_array(1);
  pack_str(pk, "abc");
  const EventBatch batch = decode_batch(bytes_of(buf));
  EXPECT_EQ(std::get<BlockRemoved>(batch.events.at(0)).block_hashes,
            std::vector<ExternalHash>{ExternalHash::from_bytes("abc")});
}

TEST(KvEventsDecode, AttnDpRankIsTheRank) {
  msgpack::sbuffer buf;
  Packer pk(buf);
  pk.pack_map(3);
  pack_str(pk, "attn_dp_rank");
  pk.pack_int(5);
  pack_str(pk, "events");
  pk.pack_array(0);
  pack_str(pk, "ts");
  pk.pack_float(1.5f);
  const EventBatch batch = decode_batch(bytes_of(buf));
  EXPECT_EQ(batch.data_parallel_rank, 5);
  EXPECT_EQ(batch.ts, 1.5);
  EXPECT_TRUE(batch.events.empty());
}

TEST(KvEventsDecode, UnknownTagsAreSkippedAndCounted) {
  msgpack::sbuffer buf;
  Packer pk(buf);
  pk.pack_array(3);
  pk.pack_double(0.0);
  pk.pack_array(4);
  pk.pack_array(3);
  pack_str(pk, "BlockMoved");
  pk.pack_int(1);
  pk.pack_map(0);
  pk.pack_array(1);
  pack_str(pk, "AllBlocksCleared");
  pk.pack_map(2);
  pack_str(pk, "type");
  pack_str(pk, "SomethingNew");
  pack_str(pk, "block_hashes");
  pack_str(pk, "not even an array");
  pk.pack_map(1);
  pack_str(pk, "type");
  pack_str(pk, "AllBlocksCleared");
  pk.pack_nil();

  std::size_t skipped = 0;
  const EventBatch batch = decode_batch(bytes_of(buf), &skipped);
  EXPECT_EQ(skipped, 2u);
  ASSERT_EQ(batch.events.size(), 2u);
  EXPECT_TRUE(std::holds_alternative<AllBlocksCleared>(batch.events[0]));
  EXPECT_TRUE(std::holds_alternative<AllBlocksCleared>(batch.events[1]));
  EXPECT_EQ(decode_batch(bytes_of(buf)).events.size(), 2u);  // the counter is optional
}

// ---------------------------------------------------------------------------------------------
// Invalid input
// ---------------------------------------------------------------------------------------------

// A batch holding one array-form BlockStored whose field at `index` is written by `field`.
template <typename WriteField>
std::string stored_with_field(std::size_t index, WriteField field) {
  msgpack::sbuffer buf;
  Packer pk(buf);
  pk.pack_array(3);
  pk.pack_double(0.0);
  pk.pack_array(1);
  pk.pack_array(8);
  pack_str(pk, "BlockStored");
  for (std::size_t i = 1; i < 8; ++i) {
    if (i == index) {
      field(pk);
      continue;
    }
    switch (i) {
      case 1: pk.pack_array(1); pk.pack_uint64(1); break;
      case 3: pk.pack_array(1); pk.pack_int(1); break;
      case 4: pk.pack_int(1); break;
      default: pk.pack_nil();
    }
  }
  pk.pack_nil();
  return bytes_of(buf);
}

TEST(KvEventsDecode, WellFormedBaselineOfTheWrongTypeCases) {
  EXPECT_NO_THROW(decode_batch(stored_with_field(0, [](Packer&) {})));
}

TEST(KvEventsDecode, WrongFieldTypesThrow) {
  const std::vector<std::pair<std::size_t, void (*)(Packer&)>> cases = {
      {1, [](Packer& pk) { pk.pack_uint64(1); }},                          // hashes not array
      {1, [](Packer& pk) { pk.pack_array(1); pk.pack_double(1.5); }},      // float hash
      {1, [](Packer& pk) { pk.pack_array(1); pk.pack_true(); }},           // bool hash
      {2, [](Packer& pk) { pk.pack_array(0); }},                           // parent an array
      {3, [](Packer& pk) { pk.pack_array(1); pk.pack_int(-1); }},          // negative token
      {3, [](Packer& pk) { pk.pack_array(1); pk.pack_uint64(1ULL << 32); }},  // token > u32
      {3, [](Packer& pk) { pk.pack_array(1); pk.pack_double(1.5); }},      // float token
      {3, [](Packer& pk) { pk.pack_nil(); }},                              // tokens nil
      {4, [](Packer& pk) { pack_str(pk, "16"); }},                         // block_size str
      {4, [](Packer& pk) { pk.pack_true(); }},                             // block_size bool
      {4, [](Packer& pk) { pk.pack_int(-16); }},                           // negative size
      {5, [](Packer& pk) { pack_str(pk, "1"); }},                          // lora_id str
      {5, [](Packer& pk) { pk.pack_uint64(~0ULL); }},                      // lora_id > i64
      {6, [](Packer& pk) { pk.pack_int(1); }},                             // medium int
      {7, [](Packer& pk) { pk.pack_array(0); }},                           // lora_name array
  };
  for (const auto& [index, field] : cases) {
    EXPECT_THROW(decode_batch(stored_with_field(index, field)), DecodeError) << "field " << index;
  }
}

TEST(KvEventsDecode, StructurallyInvalidBatchesThrow) {
  auto build = [](void (*body)(Packer&)) {
    msgpack::sbuffer buf;
    Packer pk(buf);
    body(pk);
    return bytes_of(buf);
  };
  const std::vector<void (*)(Packer&)> cases = {
      [](Packer& pk) { pk.pack_int(1); },                                      // not a batch
      [](Packer& pk) { pk.pack_array(1); pk.pack_double(0); },                 // no events
      [](Packer& pk) { pk.pack_array(2); pack_str(pk, "x"); pk.pack_array(0); },  // str ts
      [](Packer& pk) { pk.pack_array(2); pk.pack_double(0); pk.pack_nil(); },  // events nil
      [](Packer& pk) {  // rank a string
        pk.pack_array(3); pk.pack_double(0); pk.pack_array(0); pack_str(pk, "0");
      },
      [](Packer& pk) {  // map batch without events
        pk.pack_map(1); pack_str(pk, "ts"); pk.pack_double(0);
      },
      [](Packer& pk) {  // event neither array nor map
        pk.pack_array(2); pk.pack_double(0); pk.pack_array(1); pk.pack_int(3);
      },
      [](Packer& pk) {  // empty event array
        pk.pack_array(2); pk.pack_double(0); pk.pack_array(1); pk.pack_array(0);
      },
      [](Packer& pk) {  // tag not a string
        pk.pack_array(2); pk.pack_double(0); pk.pack_array(1); pk.pack_array(1); pk.pack_int(0);
      },
      [](Packer& pk) {  // map event without type
        pk.pack_array(2); pk.pack_double(0); pk.pack_array(1); pk.pack_map(0);
      },
      [](Packer& pk) {  // BlockStored array too short
        pk.pack_array(2); pk.pack_double(0); pk.pack_array(1); pk.pack_array(2);
        pack_str(pk, "BlockStored"); pk.pack_array(0);
      },
      [](Packer& pk) {  // BlockRemoved without hashes
        pk.pack_array(2); pk.pack_double(0); pk.pack_array(1); pk.pack_array(1);
        pack_str(pk, "BlockRemoved");
      },
      [](Packer& pk) {  // map BlockStored without token_ids
        pk.pack_array(2); pk.pack_double(0); pk.pack_array(1); pk.pack_map(3);
        pack_str(pk, "type"); pack_str(pk, "BlockStored");
        pack_str(pk, "block_hashes"); pk.pack_array(0);
        pack_str(pk, "block_size"); pk.pack_int(16);
      },
  };
  for (std::size_t i = 0; i < cases.size(); ++i) {
    EXPECT_THROW(decode_batch(build(cases[i])), DecodeError) << "case " << i;
  }
}

TEST(KvEventsDecode, EveryTruncationThrows) {
  for (EventEncoding encoding : {EventEncoding::kArray, EventEncoding::kMap}) {
    const std::string payload =
        encode_batch(sample_batch(HashKind::kBytes, true), {encoding, EventLayout::kVllm});
    for (std::size_t len = 0; len < payload.size(); ++len) {
      // A copy of exactly `len` bytes, so sanitizers catch any read past the end.
      const std::string prefix = payload.substr(0, len);
      EXPECT_THROW(decode_batch(prefix), DecodeError) << "prefix length " << len;
    }
    EXPECT_NO_THROW(decode_batch(payload));
  }
}

TEST(KvEventsDecode, GarbageAndTrailingBytesThrow) {
  EXPECT_THROW(decode_batch(std::string("\xc1", 1)), DecodeError);  // never-used type byte
  EXPECT_THROW(decode_batch("not msgpack at all"), DecodeError);
  std::string payload = encode_batch(EventBatch{});
  EXPECT_NO_THROW(decode_batch(payload));
  payload += '\x00';
  EXPECT_THROW(decode_batch(payload), DecodeError);
}

TEST(KvEventsDecode, HugeDeclaredSizesFailFast) {
  const std::vector<std::string> bombs = {
      std::string("\xdd\xff\xff\xff\xff", 5),                          // array32 of 2^32-1
      std::string("\xdf\xff\xff\xff\xff", 5),                          // map32 of 2^32-1
      std::string("\xdb\xff\xff\xff\xff", 5),                          // str32 of 4 GiB
      std::string("\xc6\xff\xff\xff\xff", 5),                          // bin32 of 4 GiB
      std::string("\x93\xcb\0\0\0\0\0\0\0\0\xdd\xff\xff\xff\xff\xc0", 16),  // inside a batch
      std::string("\xdd\x7f\xff\xff\xff\xdd\x7f\xff\xff\xff\xdd\x7f\xff\xff\xff", 15),  // nested
  };
  const auto start = std::chrono::steady_clock::now();
  for (const std::string& bomb : bombs) EXPECT_THROW(decode_batch(bomb), DecodeError);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
}

TEST(KvEventsDecode, DeepNestingThrows) {
  const std::string deep = std::string(100000, '\x91') + '\xc0';  // [[[...[nil]...]]]
  EXPECT_THROW(decode_batch(deep), DecodeError);
}

// ---------------------------------------------------------------------------------------------
// Sequence frames
// ---------------------------------------------------------------------------------------------

TEST(KvEventsSeq, BigEndianEightBytes) {
  EXPECT_EQ(encode_seq(0), std::string(8, '\0'));
  EXPECT_EQ(encode_seq(1), std::string("\0\0\0\0\0\0\0\x01", 8));
  EXPECT_EQ(encode_seq(0x0102030405060708), std::string("\x01\x02\x03\x04\x05\x06\x07\x08", 8));
  EXPECT_EQ(encode_seq(kReplayEndSeq), std::string(8, '\xff'));
}

TEST(KvEventsSeq, RoundTrips) {
  for (std::int64_t seq : {std::int64_t{0}, std::int64_t{1}, std::int64_t{255},
                           std::int64_t{256}, std::int64_t{-1}, std::int64_t{-2},
                           std::numeric_limits<std::int64_t>::max(),
                           std::numeric_limits<std::int64_t>::min()}) {
    EXPECT_EQ(decode_seq(encode_seq(seq)), seq);
  }
  EXPECT_EQ(decode_seq(std::string(8, '\xff')), -1);
}

TEST(KvEventsSeq, WrongSizeThrows) {
  EXPECT_THROW(decode_seq(""), DecodeError);
  EXPECT_THROW(decode_seq(std::string(7, '\0')), DecodeError);
  EXPECT_THROW(decode_seq(std::string(9, '\0')), DecodeError);
}

}  // namespace
}  // namespace omni::kv
