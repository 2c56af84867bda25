#include "prompt.hpp"

#include <array>
#include <charconv>

namespace omni::replay {

namespace {

// Common English nouns, each a single token (with its leading space) in the BPE vocabularies of
// the usual models, and at most 11 letters, so one piece of omni-sim's stand-in tokenizer too. The
// count need not be a power of two: words are picked by a 64-bit hash modulo the size.
constexpr std::array<std::string_view, 249> kWords = {
    "time",       "year",      "people",     "way",         "day",     "man",       "thing",
    "woman",      "life",      "child",      "world",       "school",  "state",     "family",
    "student",    "group",     "country",    "problem",     "hand",    "part",      "place",
    "case",       "week",      "company",    "system",      "program", "question",  "work",
    "government", "number",    "night",      "point",       "home",    "water",     "room",
    "mother",     "area",      "money",      "story",       "fact",    "month",     "lot",
    "right",      "study",     "book",       "eye",         "job",     "word",      "business",
    "issue",      "side",      "kind",       "head",        "house",   "service",   "friend",
    "father",     "power",     "hour",       "game",        "line",    "end",       "member",
    "law",        "car",       "city",       "community",   "name",    "president", "team",
    "minute",     "idea",      "body",       "information", "back",    "parent",    "face",
    "others",     "level",     "office",     "door",        "health",  "person",    "art",
    "war",        "history",   "party",      "result",      "change",  "morning",   "reason",
    "research",   "girl",      "guy",        "moment",      "air",     "teacher",   "force",
    "education",  "foot",      "boy",        "age",         "policy",  "process",   "music",
    "market",     "sense",     "nation",     "plan",        "college", "interest",  "death",
    "experience", "effect",    "class",      "control",     "care",    "field",     "development",
    "role",       "effort",    "rate",       "heart",       "drug",    "show",      "leader",
    "light",      "voice",     "wife",       "police",      "mind",    "price",     "report",
    "decision",   "son",       "view",       "spring",      "town",    "road",      "arm",
    "difference", "value",     "building",   "action",      "model",   "season",    "society",
    "tax",        "director",  "position",   "player",      "record",  "paper",     "space",
    "ground",     "form",      "event",      "official",    "matter",  "center",    "couple",
    "site",       "project",   "activity",   "star",        "table",   "need",      "court",
    "oil",        "situation", "cost",       "industry",    "figure",  "street",    "image",
    "phone",      "data",      "picture",    "practice",    "piece",   "land",      "product",
    "doctor",     "wall",      "patient",    "worker",      "news",    "test",      "movie",
    "north",      "love",      "support",    "technology",  "step",    "baby",      "computer",
    "type",       "attention", "film",       "tree",        "source",  "valley",    "hair",
    "window",     "evidence",  "population", "truth",       "song",    "energy",    "ball",
    "card",       "river",     "garden",     "summer",      "winter",  "island",    "bridge",
    "letter",     "train",     "kitchen",    "forest",      "ocean",   "mountain",  "village",
    "church",     "camera",    "glass",      "paint",       "stone",   "silver",    "gold",
    "bread",      "cheese",    "apple",      "horse",       "bird",    "fish",      "lake",
    "hill",       "cloud",     "storm",      "snow",        "rain",    "sun",       "moon",
    "color",      "square",    "circle",     "corner",
};

}  // namespace

std::string_view PromptBuilder::word(std::uint64_t hash) noexcept {
  // The high half picks the word, so text mode does not reuse the bits that picked the token id.
  return kWords[(hash >> 32) % kWords.size()];
}

void PromptBuilder::append_ids_json(const Request& r, std::string& out) const {
  out.reserve(out.size() + 2 + std::size_t{r.input_tokens} * 7);
  out.push_back('[');
  bool first = true;
  char buf[16];
  for_each_position(r, [&](std::uint64_t segment, std::uint32_t position) {
    if (!first) out.push_back(',');
    first = false;
    auto [end, ec] = std::to_chars(buf, buf + sizeof buf, token(segment, position));
    out.append(buf, end);
  });
  out.push_back(']');
}

void PromptBuilder::append_text(const Request& r, std::string& out) const {
  out.reserve(out.size() + std::size_t{r.input_tokens} * 7);
  bool first = true;
  for_each_position(r, [&](std::uint64_t segment, std::uint32_t position) {
    if (!first) out.push_back(' ');
    first = false;
    out += word(hash(segment, position));
  });
}

}  // namespace omni::replay
