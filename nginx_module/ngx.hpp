// The nginx C headers, included with C linkage. Every nginx include in the module goes through
// this file.
#pragma once

extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
}
