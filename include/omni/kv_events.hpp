// KV-cache events, the wire format engines publish on ZMQ when blocks enter and leave their
// prefix cache.
//
// Transport (vLLM ZmqEventPublisher; SGLang uses the same): a PUB socket sends multipart
// messages [topic, seq as 8-byte big-endian, msgpack payload]; seq starts at 0 and grows by one
// per batch. A ROUTER "replay" socket answers a request [identity, "", start_seq (8 bytes BE)]
// with one [identity, "", seq, payload] per buffered batch with seq >= start_seq, then an end
// marker [identity, "", 0xFF x 8, ""].
//
// Payload: EventBatch = [ts: float64, events: [...], data_parallel_rank] (vLLM; SGLang calls
// the third field attn_dp_rank). A map form {"ts":..,"events":..,"data_parallel_rank":..} is
// accepted too. Each event is tagged by its class name and encoded either
//  - as a positional array [tag, fields...] (vLLM before mid-2026, and SGLang), or
//  - as a map {"type": tag, field: value, ...} with defaulted fields omitted (vLLM since 2026).
// Field order of the array forms:
//  - vLLM   BlockStored:  block_hashes, parent_block_hash, token_ids, block_size, lora_id,
//                         medium, lora_name[, extra_keys, group_idx, ...]
//  - vLLM   BlockRemoved: block_hashes, medium[, group_idx]
//  - SGLang BlockStored:  block_hashes, parent_block_hash, token_ids, block_size, lora_id
//                         [, medium]
//  - SGLang BlockRemoved: block_hashes[, medium]
//  - AllBlocksCleared:    no fields.
// Block hashes are msgpack ints (unsigned 64-bit in vLLM, signed 64-bit in SGLang) or byte
// strings (raw digests, vLLM with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0).
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace omni::kv {

// A block hash as it travels: an integer (a signed wire value is kept as its two's-complement
// bit pattern) or a byte string.
struct ExternalHash {
  std::variant<std::uint64_t, std::string> value;

  static ExternalHash from_int(std::uint64_t v) { return ExternalHash{v}; }
  static ExternalHash from_bytes(std::string b) { return ExternalHash{std::move(b)}; }
  bool is_int() const noexcept { return std::holds_alternative<std::uint64_t>(value); }
  std::uint64_t as_int() const { return std::get<std::uint64_t>(value); }
  const std::string& as_bytes() const { return std::get<std::string>(value); }
  bool operator==(const ExternalHash&) const = default;
};

struct BlockStored {
  std::vector<ExternalHash> block_hashes;
  std::optional<ExternalHash> parent_block_hash;  // null for a chain that starts at the root
  std::vector<std::uint32_t> token_ids;           // tokens of all the stored blocks, in order
  std::uint32_t block_size = 0;
  std::optional<std::int64_t> lora_id;
  std::optional<std::string> medium;     // "GPU", "CPU", ... (absent in old encodings)
  std::optional<std::string> lora_name;
  bool operator==(const BlockStored&) const = default;
};

struct BlockRemoved {
  std::vector<ExternalHash> block_hashes;
  std::optional<std::string> medium;
  bool operator==(const BlockRemoved&) const = default;
};

struct AllBlocksCleared {
  bool operator==(const AllBlocksCleared&) const = default;
};

using Event = std::variant<BlockStored, BlockRemoved, AllBlocksCleared>;

struct EventBatch {
  double ts = 0.0;  // seconds since the epoch
  std::vector<Event> events;
  std::optional<std::int64_t> data_parallel_rank;
  bool operator==(const EventBatch&) const = default;
};

// How events are encoded inside a batch.
enum class EventEncoding { kArray, kMap };
// Whose field layout the array form follows.
enum class EventLayout { kVllm, kSglang };

struct EncodeOptions {
  EventEncoding encoding = EventEncoding::kArray;
  EventLayout layout = EventLayout::kVllm;
};

// Serializes a batch to its msgpack payload. The batch itself is always the positional array
// [ts, events, rank].
std::string encode_batch(const EventBatch& batch, const EncodeOptions& options = {});

class DecodeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Parses a payload in any of the forms above. Unknown event tags and unknown map keys are
// skipped (counted in `skipped_events` when given); structurally invalid input throws
// DecodeError. Never reads past `payload`.
EventBatch decode_batch(std::string_view payload, std::size_t* skipped_events = nullptr);

// The 8-byte big-endian sequence frame, and its inverse (DecodeError unless 8 bytes).
std::string encode_seq(std::int64_t seq);
std::int64_t decode_seq(std::string_view frame);

// The replay protocol's end-of-replay sequence number.
inline constexpr std::int64_t kReplayEndSeq = -1;

}  // namespace omni::kv
