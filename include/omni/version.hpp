// The product's version, shared by the module, the simulator and the tools.
#pragma once

namespace omni {
inline constexpr const char* kVersion = "0.1.0";
inline constexpr const char* kProductName = "omni-proxy";
}  // namespace omni
