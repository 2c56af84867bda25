#!/usr/bin/env bash
# Command 2 of README.md (and what .ci/run runs): sets up, builds, and runs every test.
#  1. the main build (warnings are errors) and its whole ctest suite: unit tests, and
#     integration tests that run omni-sim, Debian's /usr/sbin/nginx with our module, node;
#  2. the same unit and omni-sim integration tests again under AddressSanitizer and
#     UndefinedBehaviorSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
jobs=2

# -g1 (line tables only) in both builds: backtraces and sanitizer reports keep file:line, and a
# clean build takes about a fifth less CPU than with full debug info.
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DOMNI_WERROR=ON \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" \
  -DOMNI_BUILD_TESTS=ON -DOMNI_BUILD_MODULE=ON -DOMNI_BUILD_BENCH=ON
cmake --build build -j"$jobs"
ctest --test-dir build -j"$jobs" --output-on-failure --no-tests=error

cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-g1" \
  -DOMNI_WERROR=ON -DOMNI_SANITIZE=ON \
  -DOMNI_BUILD_TESTS=ON -DOMNI_BUILD_MODULE=OFF -DOMNI_BUILD_BENCH=OFF
cmake --build build-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build-asan -j"$jobs" --output-on-failure --no-tests=error -E 'demo|node'
