// OpenAI-style error bodies, the shape clients of an OpenAI-compatible server expect:
//   {"error": {"message": "...", "type": "BadRequestError", "param": null, "code": 400}}
#pragma once

#include <string>
#include <string_view>

namespace omni {

// The conventional error type name for an HTTP status (400 BadRequestError, 404
// NotFoundError, 429 RateLimitError, 500 InternalServerError, ...).
std::string_view error_type_for_status(int status) noexcept;

// A serialized error body. An empty `param` serializes as null; `type` defaults to the name
// for `status`.
std::string openai_error_body(int status, std::string_view message, std::string_view type = {},
                              std::string_view param = {});

}  // namespace omni
