#include <omni/chat_template.hpp>

namespace omni {

ChatTemplate::ChatTemplate(std::string_view source, const TokenizerConfigInfo& tokens)
    : template_(jinja::Template::parse(source)),
      base_(nlohmann::ordered_json::object()) {
  auto put = [&](const char* name, const std::string& value) {
    if (!value.empty()) base_[name] = value;
  };
  put("bos_token", tokens.bos_token);
  put("eos_token", tokens.eos_token);
  put("unk_token", tokens.unk_token);
  put("pad_token", tokens.pad_token);
}

std::string ChatTemplate::render(const nlohmann::ordered_json& messages,
                                 const nlohmann::ordered_json& tools, bool add_generation_prompt,
                                 const nlohmann::ordered_json& kwargs,
                                 const jinja::RenderOptions& options) const {
  nlohmann::ordered_json context = nlohmann::ordered_json::object();
  context["messages"] = messages;
  context["add_generation_prompt"] = add_generation_prompt;
  context["tools"] = tools;
  context["documents"] = nullptr;
  for (const auto& [key, value] : base_.items()) context[key] = value;
  if (kwargs.is_object()) {
    for (const auto& [key, value] : kwargs.items()) context[key] = value;
  }
  return template_.render(context, options);
}

std::optional<nlohmann::ordered_json> normalize_messages(const nlohmann::ordered_json& messages,
                                                         std::string& why) {
  if (!messages.is_array()) {
    why = "messages is not an array";
    return std::nullopt;
  }
  nlohmann::ordered_json out = messages;
  for (auto& msg : out) {
    if (!msg.is_object()) continue;
    auto it = msg.find("content");
    if (it == msg.end() || !it->is_array()) continue;
    std::string text;
    bool first = true;
    for (const auto& part : *it) {
      if (!part.is_object() || !part.contains("type") || part["type"] != "text" ||
          !part.contains("text") || !part["text"].is_string()) {
        why = "a message has a content part that is not text";
        return std::nullopt;
      }
      if (!first) text.push_back('\n');
      text += part["text"].get_ref<const std::string&>();
      first = false;
    }
    *it = std::move(text);
  }
  return out;
}

std::optional<ChatPrompt> encode_chat_request(const nlohmann::ordered_json& request,
                                              const ChatTemplate& chat, const Tokenizer& tokenizer,
                                              std::string& why,
                                              const jinja::RenderOptions& options) {
  auto member = [&](const char* key) {
    auto it = request.find(key);
    return it == request.end() ? nlohmann::ordered_json(nullptr) : *it;
  };
  auto flag = [&](const char* key, bool dflt) {
    auto it = request.find(key);
    return it != request.end() && it->is_boolean() ? it->get<bool>() : dflt;
  };
  auto messages = normalize_messages(member("messages"), why);
  if (!messages) return std::nullopt;
  ChatPrompt out;
  out.text = chat.render(*messages, member("tools"), flag("add_generation_prompt", true),
                         member("chat_template_kwargs"), options);
  out.ids = tokenizer.encode(out.text, flag("add_special_tokens", false));
  return out;
}

}  // namespace omni
