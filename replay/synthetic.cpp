#include "synthetic.hpp"

#include "parse.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace omni::replay {

namespace {

constexpr double kMaxLength = 1u << 30;

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string part;
  while (std::getline(ss, part, sep)) out.push_back(part);
  return out;
}

double number(const std::string& key, const std::string& v, double lo, double hi) {
  return parse_in_range("--synthetic: " + key, v, lo, hi);
}

std::uint64_t integer(const std::string& key, const std::string& v, std::uint64_t lo,
                      std::uint64_t hi) {
  return parse_in_range("--synthetic: " + key, v, lo, hi);
}

}  // namespace

LengthDist LengthDist::parse(const std::string& text) {
  const auto parts = split(text, ':');
  const std::string what = "length \"" + text + "\"";
  LengthDist d;
  if (parts.size() == 1 || (parts.size() == 2 && parts[0] == "fixed")) {
    d.kind = Kind::kFixed;
    d.a = number(what, parts.back(), 1, kMaxLength);
  } else if (parts.size() == 3 && parts[0] == "uniform") {
    d.kind = Kind::kUniform;
    d.a = number(what, parts[1], 1, kMaxLength);
    d.b = number(what, parts[2], d.a, kMaxLength);
  } else if (parts.size() == 3 && parts[0] == "lognormal") {
    d.kind = Kind::kLognormal;
    d.a = number(what, parts[1], 1, kMaxLength);
    d.b = number(what, parts[2], 0, 100);
  } else {
    throw std::invalid_argument("--synthetic: " + what +
                                ": expected N, fixed:N, uniform:A:B or lognormal:MEAN:CV");
  }
  return d;
}

std::uint32_t LengthDist::sample(SplitMix64& rng) const {
  double v = a;
  switch (kind) {
    case Kind::kFixed:
      break;
    case Kind::kUniform:
      v = std::ceil(a) + std::floor(rng.uniform() * (std::floor(b) - std::ceil(a) + 1));
      break;
    case Kind::kLognormal: {
      // Mean m and cv c: sigma^2 = ln(1 + c^2), mu = ln(m) - sigma^2 / 2.
      const double s2 = std::log1p(b * b);
      v = std::round(std::exp(std::log(a) - s2 / 2 + std::sqrt(s2) * rng.normal()));
      break;
    }
  }
  return static_cast<std::uint32_t>(std::clamp(v, 1.0, kMaxLength));
}

SyntheticSpec parse_synthetic(const std::string& text) {
  SyntheticSpec s;
  std::set<std::string> seen;
  for (const auto& item : split(text, ',')) {
    if (item.empty()) continue;
    const auto eq = item.find('=');
    if (eq == std::string::npos) {
      throw std::invalid_argument("--synthetic: \"" + item + "\" is not KEY=VALUE");
    }
    const std::string key = item.substr(0, eq), v = item.substr(eq + 1);
    if (!seen.insert(key).second)
      throw std::invalid_argument("--synthetic: " + key + " given twice");
    if (key == "requests")
      s.requests = integer(key, v, 1, kMaxSyntheticRequests);
    else if (key == "duration")
      s.duration_s = number(key, v, 0, 1e9);
    else if (key == "rate")
      s.rate = number(key, v, 1e-6, 1e7);
    else if (key == "arrival") {
      if (v != "poisson" && v != "fixed") {
        throw std::invalid_argument("--synthetic: arrival: expected poisson or fixed, got \"" + v +
                                    "\"");
      }
      s.poisson = v == "poisson";
    } else if (key == "input")
      s.input = LengthDist::parse(v);
    else if (key == "output")
      s.output = LengthDist::parse(v);
    else if (key == "prefixes")
      s.prefixes = static_cast<std::uint32_t>(integer(key, v, 0, 1 << 20));
    else if (key == "prefix_len")
      s.prefix_len = static_cast<std::uint32_t>(integer(key, v, 0, 1 << 30));
    else if (key == "users")
      s.users = static_cast<std::uint32_t>(integer(key, v, 1, 1 << 20));
    else if (key == "turns")
      s.turns = static_cast<std::uint32_t>(integer(key, v, 1, 1 << 20));
    else
      throw std::invalid_argument("--synthetic: unknown key \"" + key + "\"");
  }
  if (!s.requests && !s.duration_s) {
    throw std::invalid_argument("--synthetic: requests=N or duration=S is required");
  }
  if (s.rate <= 0) throw std::invalid_argument("--synthetic: rate=R (requests/s) is required");
  if (!s.requests && *s.duration_s * s.rate > static_cast<double>(kMaxSyntheticRequests)) {
    throw std::invalid_argument("--synthetic: duration x rate is more than " +
                                std::to_string(kMaxSyntheticRequests) + " requests");
  }
  if (s.prefixes > 0 && s.prefix_len == 0) {
    throw std::invalid_argument("--synthetic: prefixes=N needs prefix_len=TOKENS");
  }
  if (s.prefixes == 0 && s.prefix_len > 0) {
    throw std::invalid_argument("--synthetic: prefix_len=TOKENS needs prefixes=N");
  }
  if (std::uint64_t{std::max<std::uint32_t>(s.prefixes, 1)} * s.users > (1u << 20)) {
    throw std::invalid_argument("--synthetic: prefixes x users is more than 1048576 slots");
  }
  return s;
}

Workload generate_synthetic(const SyntheticSpec& spec, const std::string& text,
                            std::uint64_t seed) {
  // One stream for arrivals and one for the conversation structure and lengths, so changing
  // the rate keeps the same prompts and the other way round.
  SplitMix64 arrivals(SplitMix64::mix3(seed, 1, 0));
  SplitMix64 content(SplitMix64::mix3(seed, 2, 0));

  struct Slot {
    std::vector<Segment> history;  // earlier questions and answers of the conversation
    std::uint64_t history_tokens = 0;
    std::uint32_t turns_done = 0;
  };
  const std::uint32_t groups = std::max<std::uint32_t>(spec.prefixes, 1);
  std::vector<Slot> slots(std::size_t{groups} * spec.users);
  // Ids 0..prefixes-1 are the system prompts; questions and answers take fresh ids after them.
  std::uint64_t next_id = spec.prefixes;

  Workload w;
  w.source = "synthetic";
  w.path = text;
  const std::uint64_t count = spec.requests.value_or(kMaxSyntheticRequests);
  double t = 0;
  for (std::uint64_t i = 0; i < count; ++i) {
    t = spec.poisson ? t + arrivals.exponential(spec.rate) : static_cast<double>(i) / spec.rate;
    if (spec.duration_s && t >= *spec.duration_s) break;
    const std::size_t slot_index = content.next() % slots.size();
    Slot& slot = slots[slot_index];
    Request r;
    r.arrival_s = t;
    std::uint64_t tokens = 0;
    if (spec.prefixes > 0) {
      r.segments.push_back({slot_index / spec.users, spec.prefix_len});
      tokens += spec.prefix_len;
    }
    r.segments.insert(r.segments.end(), slot.history.begin(), slot.history.end());
    tokens += slot.history_tokens;
    const Segment question{next_id++, spec.input.sample(content)};
    const Segment answer{next_id++, spec.output.sample(content)};
    r.segments.push_back(question);
    tokens += question.length;
    if (tokens > std::numeric_limits<std::uint32_t>::max()) {
      throw std::invalid_argument("--synthetic: a prompt grows past 2^32 tokens; fewer turns");
    }
    r.input_tokens = static_cast<std::uint32_t>(tokens);
    r.output_tokens = answer.length;
    w.requests.push_back(std::move(r));
    if (++slot.turns_done == spec.turns) {
      slot = Slot{};
    } else {
      slot.history.push_back(question);
      slot.history.push_back(answer);
      slot.history_tokens += question.length + answer.length;
    }
  }
  return w;
}

}  // namespace omni::replay
