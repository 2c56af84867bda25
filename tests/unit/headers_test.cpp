// Every public header of the core compiles on its own and together with all the others, so two
// headers can never define the same name differently.
#include <omni/block_hash.hpp>
#include <omni/engine_metrics.hpp>
#include <omni/kv_events.hpp>
#include <omni/lifecycle.hpp>
#include <omni/openai_error.hpp>
#include <omni/policy.hpp>
#include <omni/prometheus.hpp>
#include <omni/request_body.hpp>
#include <omni/shared_state.hpp>
#include <omni/version.hpp>

#include <gtest/gtest.h>

#include <string_view>

TEST(Headers, AllCoreHeadersCompileTogether) {
  EXPECT_EQ(std::string_view(omni::kProductName), "omni-proxy");
}
