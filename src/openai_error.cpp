#include <omni/openai_error.hpp>

#include <nlohmann/json.hpp>

namespace omni {

std::string_view error_type_for_status(int status) noexcept {
  switch (status) {
    case 400: return "BadRequestError";
    case 401: return "AuthenticationError";
    case 403: return "PermissionDeniedError";
    case 404: return "NotFoundError";
    case 405: return "MethodNotAllowedError";
    case 408: return "TimeoutError";
    case 409: return "ConflictError";
    case 413: return "RequestTooLargeError";
    case 415: return "UnsupportedMediaTypeError";
    case 422: return "UnprocessableEntityError";
    case 429: return "RateLimitError";
    case 502: return "BadGatewayError";
    case 503: return "ServiceUnavailableError";
    case 504: return "GatewayTimeoutError";
    default: return status >= 500 ? "InternalServerError" : "BadRequestError";
  }
}

std::string openai_error_body(int status, std::string_view message, std::string_view type,
                              std::string_view param) {
  nlohmann::json err = {
      {"message", std::string(message)},
      {"type", std::string(type.empty() ? error_type_for_status(status) : type)},
      {"param", param.empty() ? nlohmann::json(nullptr) : nlohmann::json(std::string(param))},
      {"code", status},
  };
  // Invalid UTF-8 in a message (echoed user input) is replaced, never thrown on.
  return nlohmann::json{{"error", std::move(err)}}.dump(-1, ' ', false,
                                                        nlohmann::json::error_handler_t::replace);
}

}  // namespace omni
