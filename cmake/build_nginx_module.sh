#!/usr/bin/env bash
# Driven by CMake (cmake/NginxModule.cmake); see there for the variables it passes.
set -euo pipefail
: "${OMNI_NGINX_SRC:?}" "${OMNI_NGINX_BUILD_DIR:?}" "${OMNI_MODULE_DIR:?}" "${OMNI_CORE_LIB:?}"
: "${OMNI_INCLUDE_DIR:?}" "${OMNI_CXX:?}"
here="$(cd "$(dirname "$0")" && pwd)"
stamp="$OMNI_NGINX_BUILD_DIR/.omni-configured"
# Reconfigure when the module's config, the wrapper or the inputs changed.
want="$(cat "$OMNI_MODULE_DIR/config" "$here/nginx-cc" | sha256sum | cut -d' ' -f1) $OMNI_CORE_LIB $OMNI_INCLUDE_DIR $OMNI_CXX ${OMNI_CXX_FLAGS:-}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -f "$OMNI_NGINX_BUILD_DIR/objs/Makefile" ]; then
  rm -rf "$OMNI_NGINX_BUILD_DIR"
  mkdir -p "$OMNI_NGINX_BUILD_DIR"
  cp -a "$OMNI_NGINX_SRC/." "$OMNI_NGINX_BUILD_DIR/"
  cd "$OMNI_NGINX_BUILD_DIR"
  # shellcheck disable=SC1091
  source ./conf_flags
  export OMNI_CORE_LIB OMNI_INCLUDE_DIR OMNI_CXX OMNI_CXX_FLAGS
  ./configure "${NGX_CONF_FLAGS[@]}" --with-cc="$here/nginx-cc" \
      --add-dynamic-module="$OMNI_MODULE_DIR" > configure.log 2>&1 \
    || { tail -40 configure.log >&2; exit 1; }
  echo "$want" > "$stamp"
fi
cd "$OMNI_NGINX_BUILD_DIR"
# The core library is not a make dependency of the .so; relink every time (it is cheap).
rm -f objs/ngx_http_omni_proxy_module.so
export OMNI_CXX OMNI_CXX_FLAGS
make -s -f objs/Makefile modules -j"$(nproc)"
test -f objs/ngx_http_omni_proxy_module.so
