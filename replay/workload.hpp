// The workload omni-bench replays: requests with an arrival time, lengths, and a prompt
// described as a chain of segments, read from a Mooncake or Azure trace (or generated, see
// synthetic.hpp).
//
// A prompt is never stored as tokens: it is a list of segments, each an id and a length, and
// PromptBuilder (prompt.hpp) derives segment `id`'s token at position p from (seed, id, p).
// Two requests whose segment lists start alike therefore send equal prompt prefixes, which is
// what lets the engines' prefix caches hit as they would on the real workload.
#pragma once

#include <cstdint>
#include <istream>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace omni::replay {

struct Segment {
  std::uint64_t id = 0;
  std::uint32_t length = 0;  // tokens
};

struct Request {
  double arrival_s = 0;  // trace time, relative to the first request kept
  std::uint32_t input_tokens = 0;
  std::uint32_t output_tokens = 0;
  // Covers at least input_tokens tokens; the prompt is their concatenation cut to input_tokens.
  std::vector<Segment> segments;
};

struct Workload {
  std::string source;               // "mooncake", "azure", "synthetic"
  std::string path;                 // trace file, or the synthetic spec
  std::vector<Request> requests;    // in arrival order
  std::uint64_t skipped_lines = 0;  // malformed lines skipped under --skip-bad-lines
};

// How to read a trace, and which part of it to keep. The window is applied first (requests
// with start <= timestamp < start + window), then the limit (the first `limit` of those); kept
// requests are re-based so that the first one arrives at 0.
struct TraceOptions {
  double start_s = 0;
  std::optional<double> window_s;
  std::optional<std::uint64_t> limit;
  bool skip_bad_lines = false;
  std::uint32_t hash_block_tokens = 512;  // Mooncake: tokens per hash id
};

// A trace that cannot be read, or a malformed line: the message names the file and line.
class TraceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Mooncake JSONL: {"timestamp": ms, "input_length": n, "output_length": n, "hash_ids": [...]}
// with ceil(input_length / hash_block_tokens) hash ids; equal ids are equal prompt blocks.
Workload read_mooncake(std::istream& in, const std::string& name, const TraceOptions& slice);
// Azure LLM inference trace CSV: TIMESTAMP,ContextTokens,GeneratedTokens, timestamps like
// "2023-11-16 18:17:03.9799600". Every request gets prompt segments of its own.
Workload read_azure(std::istream& in, const std::string& name, const TraceOptions& slice);

// "mooncake:PATH" or "azure:PATH": opens and reads the file.
Workload load_trace(const std::string& spec, const TraceOptions& slice);

// Keeps the window and limit of `requests` (sorted by arrival) and re-bases arrivals.
void apply_slice(std::vector<Request>& requests, const TraceOptions& slice);

}  // namespace omni::replay
