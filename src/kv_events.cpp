#include <omni/kv_events.hpp>

#include <msgpack.hpp>

#include <bit>
#include <limits>
#include <span>

namespace omni::kv {
namespace {

// Event tags: the Python class names vLLM's and SGLang's msgspec structs are tagged with.
constexpr std::string_view kTagBlockStored = "BlockStored";
constexpr std::string_view kTagBlockRemoved = "BlockRemoved";
constexpr std::string_view kTagAllBlocksCleared = "AllBlocksCleared";

// Field names of the map forms (the msgspec struct field names).
constexpr std::string_view kKeyType = "type";
constexpr std::string_view kKeyBlockHashes = "block_hashes";
constexpr std::string_view kKeyParent = "parent_block_hash";
constexpr std::string_view kKeyTokenIds = "token_ids";
constexpr std::string_view kKeyBlockSize = "block_size";
constexpr std::string_view kKeyLoraId = "lora_id";
constexpr std::string_view kKeyMedium = "medium";
constexpr std::string_view kKeyLoraName = "lora_name";
constexpr std::string_view kKeyTs = "ts";
constexpr std::string_view kKeyEvents = "events";
constexpr std::string_view kKeyDpRank = "data_parallel_rank";
constexpr std::string_view kKeyAttnDpRank = "attn_dp_rank";  // SGLang's name for the same field

// Deepest container nesting accepted. A real batch nests about six levels (batch, events,
// event, extra_keys, tuple, ...); the bound caps what msgpack::unpack preallocates for
// containers that are still open when a payload ends.
constexpr std::size_t kMaxDepth = 32;

// ------------------------------------------------------------------------------------------
// Encoding
// ------------------------------------------------------------------------------------------

// msgpack::packer's stream: appends to a std::string.
class StringSink {
 public:
  explicit StringSink(std::string& out) : out_(out) {}
  void write(const char* data, std::size_t size) { out_.append(data, size); }

 private:
  std::string& out_;
};

using Packer = msgpack::packer<StringSink>;

// msgpack lengths are 32-bit.
std::uint32_t wire_size(std::size_t size) {
  if (size > std::numeric_limits<std::uint32_t>::max()) {
    throw std::invalid_argument("kv event field too large for msgpack");
  }
  return static_cast<std::uint32_t>(size);
}

// Always the 9-byte float64 form: msgpack-cxx 4's pack_double writes integral values as ints,
// but the batch's ts is a float64 on the wire (vLLM: `ts: float`).
void pack_float64(std::string& out, double d) {
  const auto bits = std::bit_cast<std::uint64_t>(d);
  out += static_cast<char>(0xcb);
  for (int shift = 56; shift >= 0; shift -= 8) out += static_cast<char>(bits >> shift);
}

void pack_str(Packer& pk, std::string_view s) {
  const std::uint32_t n = wire_size(s.size());
  pk.pack_str(n);
  pk.pack_str_body(s.data(), n);
}

void pack_hash(Packer& pk, const ExternalHash& hash) {
  if (hash.is_int()) {
    pk.pack_uint64(hash.as_int());
  } else {
    const std::string& bytes = hash.as_bytes();
    const std::uint32_t n = wire_size(bytes.size());
    pk.pack_bin(n);
    pk.pack_bin_body(bytes.data(), n);
  }
}

void pack_hashes(Packer& pk, const std::vector<ExternalHash>& hashes) {
  pk.pack_array(wire_size(hashes.size()));
  for (const ExternalHash& h : hashes) pack_hash(pk, h);
}

void pack_opt_hash(Packer& pk, const std::optional<ExternalHash>& hash) {
  if (hash) {
    pack_hash(pk, *hash);
  } else {
    pk.pack_nil();
  }
}

void pack_tokens(Packer& pk, const std::vector<std::uint32_t>& tokens) {
  pk.pack_array(wire_size(tokens.size()));
  for (std::uint32_t t : tokens) pk.pack_uint32(t);
}

void pack_opt_int(Packer& pk, const std::optional<std::int64_t>& v) {
  if (v) {
    pk.pack_int64(*v);
  } else {
    pk.pack_nil();
  }
}

void pack_opt_str(Packer& pk, const std::optional<std::string>& s) {
  if (s) {
    pack_str(pk, *s);
  } else {
    pk.pack_nil();
  }
}

// Array forms follow the field orders in the header. vLLM structs declare every field without
// a default, so all are written; SGLang's BlockStored ends at lora_id with medium optional, and
// has no lora_name at all (it is dropped).
void pack_array_event(Packer& pk, const BlockStored& ev, EventLayout layout) {
  const bool vllm = layout == EventLayout::kVllm;
  pk.pack_array(vllm ? 8 : (ev.medium ? 7 : 6));
  pack_str(pk, kTagBlockStored);
  pack_hashes(pk, ev.block_hashes);
  pack_opt_hash(pk, ev.parent_block_hash);
  pack_tokens(pk, ev.token_ids);
  pk.pack_uint32(ev.block_size);
  pack_opt_int(pk, ev.lora_id);
  if (vllm) {
    pack_opt_str(pk, ev.medium);
    pack_opt_str(pk, ev.lora_name);
  } else if (ev.medium) {
    pack_str(pk, *ev.medium);
  }
}

void pack_array_event(Packer& pk, const BlockRemoved& ev, EventLayout layout) {
  const bool vllm = layout == EventLayout::kVllm;
  pk.pack_array(vllm || ev.medium ? 3 : 2);
  pack_str(pk, kTagBlockRemoved);
  pack_hashes(pk, ev.block_hashes);
  if (vllm || ev.medium) pack_opt_str(pk, ev.medium);
}

void pack_array_event(Packer& pk, const AllBlocksCleared&, EventLayout) {
  pk.pack_array(1);
  pack_str(pk, kTagAllBlocksCleared);
}

// Map forms (msgspec omit_defaults): empty optionals are left out, except vLLM's
// parent_block_hash and lora_id, which have no default and so are always present.
void pack_map_event(Packer& pk, const BlockStored& ev, EventLayout layout) {
  const bool vllm = layout == EventLayout::kVllm;
  const bool with_parent = vllm || ev.parent_block_hash.has_value();
  const bool with_lora_id = vllm || ev.lora_id.has_value();
  pk.pack_map(4 + with_parent + with_lora_id + ev.medium.has_value() +
              ev.lora_name.has_value());
  pack_str(pk, kKeyType);
  pack_str(pk, kTagBlockStored);
  pack_str(pk, kKeyBlockHashes);
  pack_hashes(pk, ev.block_hashes);
  if (with_parent) {
    pack_str(pk, kKeyParent);
    pack_opt_hash(pk, ev.parent_block_hash);
  }
  pack_str(pk, kKeyTokenIds);
  pack_tokens(pk, ev.token_ids);
  pack_str(pk, kKeyBlockSize);
  pk.pack_uint32(ev.block_size);
  if (with_lora_id) {
    pack_str(pk, kKeyLoraId);
    pack_opt_int(pk, ev.lora_id);
  }
  if (ev.medium) {
    pack_str(pk, kKeyMedium);
    pack_str(pk, *ev.medium);
  }
  if (ev.lora_name) {
    pack_str(pk, kKeyLoraName);
    pack_str(pk, *ev.lora_name);
  }
}

void pack_map_event(Packer& pk, const BlockRemoved& ev, EventLayout) {
  pk.pack_map(2 + ev.medium.has_value());
  pack_str(pk, kKeyType);
  pack_str(pk, kTagBlockRemoved);
  pack_str(pk, kKeyBlockHashes);
  pack_hashes(pk, ev.block_hashes);
  if (ev.medium) {
    pack_str(pk, kKeyMedium);
    pack_str(pk, *ev.medium);
  }
}

void pack_map_event(Packer& pk, const AllBlocksCleared&, EventLayout) {
  pk.pack_map(1);
  pack_str(pk, kKeyType);
  pack_str(pk, kTagAllBlocksCleared);
}

// ------------------------------------------------------------------------------------------
// Decoding
// ------------------------------------------------------------------------------------------

using Object = msgpack::object;
namespace mtype = msgpack::type;

[[noreturn]] void fail(std::string_view what) {
  throw DecodeError("kv events: " + std::string(what));
}

// Walks a payload without building anything. Passing it proves the payload is one complete
// msgpack object no deeper than kMaxDepth, so every declared container size is backed by at
// least that many bytes before msgpack::unpack allocates by the declared sizes.
struct ScanVisitor : msgpack::null_visitor {
  std::size_t depth = 0;
  bool enter() { return ++depth <= kMaxDepth; }
  bool start_array(std::uint32_t) { return enter(); }
  bool end_array() {
    --depth;
    return true;
  }
  bool start_map(std::uint32_t) { return enter(); }
  bool end_map() {
    --depth;
    return true;
  }
};

msgpack::object_handle unpack_payload(std::string_view payload) {
  try {
    ScanVisitor scan;
    std::size_t off = 0;
    if (!msgpack::parse(payload.data(), payload.size(), off, scan)) {
      fail(scan.depth > kMaxDepth ? "payload nested too deeply" : "malformed msgpack payload");
    }
    if (off != payload.size()) fail("trailing bytes after msgpack payload");
    // Belt and braces on top of the scan: no container or string can declare more elements
    // or bytes than the payload holds.
    const std::size_t n = payload.size();
    const msgpack::unpack_limit limit(/*array=*/n, /*map=*/n / 2, /*str=*/n, /*bin=*/n,
                                      /*ext=*/n, /*depth=*/kMaxDepth);
    off = 0;
    return msgpack::unpack(payload.data(), payload.size(), off, nullptr, nullptr, limit);
  } catch (const msgpack::unpack_error& e) {
    fail(e.what());
  }
}

std::string_view str_view(const Object& o) { return {o.via.str.ptr, o.via.str.size}; }

std::span<const Object> as_array(const Object& o, std::string_view field) {
  if (o.type != mtype::ARRAY) fail(std::string(field) + " must be an array");
  return {o.via.array.ptr, o.via.array.size};
}

std::string_view as_str(const Object& o, std::string_view field) {
  if (o.type != mtype::STR) fail(std::string(field) + " must be a string");
  return str_view(o);
}

std::optional<std::string> as_opt_str(const Object& o, std::string_view field) {
  if (o.type == mtype::NIL) return std::nullopt;
  return std::string(as_str(o, field));
}

std::optional<std::int64_t> as_opt_int64(const Object& o, std::string_view field) {
  switch (o.type) {
    case mtype::NIL:
      return std::nullopt;
    case mtype::POSITIVE_INTEGER:
      if (o.via.u64 > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
        fail(std::string(field) + " out of int64 range");
      }
      return static_cast<std::int64_t>(o.via.u64);
    case mtype::NEGATIVE_INTEGER:
      return o.via.i64;
    default:
      fail(std::string(field) + " must be an integer or nil");
  }
}

std::uint32_t as_u32(const Object& o, std::string_view field) {
  if (o.type != mtype::POSITIVE_INTEGER || o.via.u64 > std::numeric_limits<std::uint32_t>::max()) {
    fail(std::string(field) + " must be an integer in [0, 2^32)");
  }
  return static_cast<std::uint32_t>(o.via.u64);
}

double as_number(const Object& o, std::string_view field) {
  switch (o.type) {
    case mtype::FLOAT32:
    case mtype::FLOAT64:
      return o.via.f64;
    case mtype::POSITIVE_INTEGER:
      return static_cast<double>(o.via.u64);
    case mtype::NEGATIVE_INTEGER:
      return static_cast<double>(o.via.i64);
    default:
      fail(std::string(field) + " must be a number");
  }
}

// Unsigned (vLLM) and signed (SGLang) ints share one representation: the 64-bit pattern.
ExternalHash as_hash(const Object& o, std::string_view field) {
  switch (o.type) {
    case mtype::POSITIVE_INTEGER:
      return ExternalHash::from_int(o.via.u64);
    case mtype::NEGATIVE_INTEGER:
      return ExternalHash::from_int(static_cast<std::uint64_t>(o.via.i64));
    case mtype::BIN:
      return ExternalHash::from_bytes(std::string(o.via.bin.ptr, o.via.bin.size));
    case mtype::STR:
      return ExternalHash::from_bytes(std::string(str_view(o)));
    default:
      fail(std::string(field) + " must be an integer or a byte string");
  }
}

std::optional<ExternalHash> as_opt_hash(const Object& o, std::string_view field) {
  if (o.type == mtype::NIL) return std::nullopt;
  return as_hash(o, field);
}

std::vector<ExternalHash> as_hashes(const Object& o, std::string_view field) {
  std::span<const Object> items = as_array(o, field);
  std::vector<ExternalHash> out;
  out.reserve(items.size());
  for (const Object& item : items) out.push_back(as_hash(item, field));
  return out;
}

std::vector<std::uint32_t> as_tokens(const Object& o) {
  std::span<const Object> items = as_array(o, kKeyTokenIds);
  std::vector<std::uint32_t> out;
  out.reserve(items.size());
  for (const Object& item : items) out.push_back(as_u32(item, kKeyTokenIds));
  return out;
}

std::span<const msgpack::object_kv> map_entries(const Object& o) {
  return {o.via.map.ptr, o.via.map.size};
}

// The value under a string key, or null. Non-string keys never match.
const Object* find_key(const Object& map, std::string_view key) {
  for (const msgpack::object_kv& kv : map_entries(map)) {
    if (kv.key.type == mtype::STR && str_view(kv.key) == key) return &kv.val;
  }
  return nullptr;
}

const Object& require_key(const Object& map, std::string_view key, std::string_view tag) {
  const Object* v = find_key(map, key);
  if (v == nullptr) fail(std::string(tag) + " lacks " + std::string(key));
  return *v;
}

// Positions 0..7 of BlockStored are common to vLLM and SGLang (SGLang stops after medium);
// anything after lora_name (extra_keys, group_idx, ...) is ignored.
BlockStored decode_stored_array(std::span<const Object> a) {
  if (a.size() < 5) fail("BlockStored array too short");
  BlockStored ev;
  ev.block_hashes = as_hashes(a[1], kKeyBlockHashes);
  ev.parent_block_hash = as_opt_hash(a[2], kKeyParent);
  ev.token_ids = as_tokens(a[3]);
  ev.block_size = as_u32(a[4], kKeyBlockSize);
  if (a.size() > 5) ev.lora_id = as_opt_int64(a[5], kKeyLoraId);
  if (a.size() > 6) ev.medium = as_opt_str(a[6], kKeyMedium);
  if (a.size() > 7) ev.lora_name = as_opt_str(a[7], kKeyLoraName);
  return ev;
}

BlockRemoved decode_removed_array(std::span<const Object> a) {
  if (a.size() < 2) fail("BlockRemoved array too short");
  BlockRemoved ev;
  ev.block_hashes = as_hashes(a[1], kKeyBlockHashes);
  if (a.size() > 2) ev.medium = as_opt_str(a[2], kKeyMedium);
  return ev;
}

BlockStored decode_stored_map(const Object& m) {
  BlockStored ev;
  ev.block_hashes = as_hashes(require_key(m, kKeyBlockHashes, kTagBlockStored), kKeyBlockHashes);
  ev.token_ids = as_tokens(require_key(m, kKeyTokenIds, kTagBlockStored));
  ev.block_size = as_u32(require_key(m, kKeyBlockSize, kTagBlockStored), kKeyBlockSize);
  if (const Object* v = find_key(m, kKeyParent)) ev.parent_block_hash = as_opt_hash(*v, kKeyParent);
  if (const Object* v = find_key(m, kKeyLoraId)) ev.lora_id = as_opt_int64(*v, kKeyLoraId);
  if (const Object* v = find_key(m, kKeyMedium)) ev.medium = as_opt_str(*v, kKeyMedium);
  if (const Object* v = find_key(m, kKeyLoraName)) ev.lora_name = as_opt_str(*v, kKeyLoraName);
  return ev;
}

BlockRemoved decode_removed_map(const Object& m) {
  BlockRemoved ev;
  ev.block_hashes =
      as_hashes(require_key(m, kKeyBlockHashes, kTagBlockRemoved), kKeyBlockHashes);
  if (const Object* v = find_key(m, kKeyMedium)) ev.medium = as_opt_str(*v, kKeyMedium);
  return ev;
}

// An event, or nothing for an unknown tag.
std::optional<Event> decode_event(const Object& o) {
  if (o.type == mtype::ARRAY) {
    std::span<const Object> a = as_array(o, "event");
    if (a.empty()) fail("empty event array");
    const std::string_view tag = as_str(a[0], "event tag");
    if (tag == kTagBlockStored) return decode_stored_array(a);
    if (tag == kTagBlockRemoved) return decode_removed_array(a);
    if (tag == kTagAllBlocksCleared) return AllBlocksCleared{};
    return std::nullopt;
  }
  if (o.type == mtype::MAP) {
    const Object* type = find_key(o, kKeyType);
    if (type == nullptr) fail("event map lacks type");
    const std::string_view tag = as_str(*type, "event type");
    if (tag == kTagBlockStored) return decode_stored_map(o);
    if (tag == kTagBlockRemoved) return decode_removed_map(o);
    if (tag == kTagAllBlocksCleared) return AllBlocksCleared{};
    return std::nullopt;
  }
  fail("event must be an array or a map");
}

}  // namespace

std::string encode_batch(const EventBatch& batch, const EncodeOptions& options) {
  std::string out;
  StringSink sink(out);
  Packer pk(sink);
  pk.pack_array(3);
  pack_float64(out, batch.ts);  // the packer writes through to `out`, so order is kept
  pk.pack_array(wire_size(batch.events.size()));
  for (const Event& event : batch.events) {
    std::visit(
        [&](const auto& ev) {
          if (options.encoding == EventEncoding::kArray) {
            pack_array_event(pk, ev, options.layout);
          } else {
            pack_map_event(pk, ev, options.layout);
          }
        },
        event);
  }
  pack_opt_int(pk, batch.data_parallel_rank);
  return out;
}

EventBatch decode_batch(std::string_view payload, std::size_t* skipped_events) {
  const msgpack::object_handle handle = unpack_payload(payload);
  const Object& root = handle.get();

  const Object* ts = nullptr;
  const Object* events = nullptr;
  const Object* rank = nullptr;
  if (root.type == mtype::ARRAY) {
    std::span<const Object> a = as_array(root, "batch");
    if (a.size() < 2) fail("batch array too short");
    ts = &a[0];
    events = &a[1];
    if (a.size() > 2) rank = &a[2];
  } else if (root.type == mtype::MAP) {
    ts = &require_key(root, kKeyTs, "batch");
    events = &require_key(root, kKeyEvents, "batch");
    rank = find_key(root, kKeyDpRank);
    if (rank == nullptr) rank = find_key(root, kKeyAttnDpRank);
  } else {
    fail("batch must be an array or a map");
  }

  EventBatch batch;
  batch.ts = as_number(*ts, kKeyTs);
  if (rank != nullptr) batch.data_parallel_rank = as_opt_int64(*rank, kKeyDpRank);
  std::size_t skipped = 0;
  std::span<const Object> items = as_array(*events, kKeyEvents);
  batch.events.reserve(items.size());
  for (const Object& item : items) {
    if (std::optional<Event> ev = decode_event(item)) {
      batch.events.push_back(std::move(*ev));
    } else {
      ++skipped;
    }
  }
  if (skipped_events != nullptr) *skipped_events = skipped;
  return batch;
}

std::string encode_seq(std::int64_t seq) {
  const auto bits = static_cast<std::uint64_t>(seq);
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(bits >> (8 * (7 - i)));
  return out;
}

std::int64_t decode_seq(std::string_view frame) {
  if (frame.size() != 8) fail("sequence frame must be 8 bytes");
  std::uint64_t bits = 0;
  for (char c : frame) bits = (bits << 8) | static_cast<unsigned char>(c);
  return static_cast<std::int64_t>(bits);
}

}  // namespace omni::kv
