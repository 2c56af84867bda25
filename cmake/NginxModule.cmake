# Builds ngx_http_omni_proxy_module.so with nginx's own build system: a copy of Debian's
# nginx-dev configure tree, `configure --with-compat --add-dynamic-module`, then
# `make -f objs/Makefile modules`. The core library is linked in statically.
set(OMNI_NGINX_BUILD_DIR ${CMAKE_BINARY_DIR}/nginx-build)
set(OMNI_MODULE_SO ${OMNI_NGINX_BUILD_DIR}/objs/ngx_http_omni_proxy_module.so)
file(GLOB OMNI_MODULE_SOURCES CONFIGURE_DEPENDS
  ${CMAKE_SOURCE_DIR}/nginx_module/*.cpp ${CMAKE_SOURCE_DIR}/nginx_module/*.hpp)
file(GLOB_RECURSE OMNI_CORE_HEADERS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/include/omni/*.hpp)

if(NOT EXISTS ${OMNI_NGINX_SRC}/configure)
  message(FATAL_ERROR "nginx configure tree not found in ${OMNI_NGINX_SRC}; run scripts/setup.sh")
endif()

add_custom_command(
  OUTPUT ${OMNI_MODULE_SO}
  COMMAND ${CMAKE_COMMAND} -E env
          OMNI_NGINX_SRC=${OMNI_NGINX_SRC}
          OMNI_NGINX_BUILD_DIR=${OMNI_NGINX_BUILD_DIR}
          OMNI_MODULE_DIR=${CMAKE_SOURCE_DIR}/nginx_module
          OMNI_CORE_LIB=$<TARGET_FILE:omni_core_nginx>
          OMNI_INCLUDE_DIR=${CMAKE_SOURCE_DIR}/include
          OMNI_CXX=${CMAKE_CXX_COMPILER}
          OMNI_CXX_FLAGS=${OMNI_MODULE_CXX_FLAGS}
          bash ${CMAKE_SOURCE_DIR}/cmake/build_nginx_module.sh
  DEPENDS omni_core_nginx ${OMNI_MODULE_SOURCES} ${OMNI_CORE_HEADERS}
          ${CMAKE_SOURCE_DIR}/nginx_module/config
          ${CMAKE_SOURCE_DIR}/nginx_module/exports.map
          ${CMAKE_SOURCE_DIR}/cmake/build_nginx_module.sh
          ${CMAKE_SOURCE_DIR}/cmake/nginx-cc
  COMMENT "Building ngx_http_omni_proxy_module.so with nginx's configure and make"
  VERBATIM)
add_custom_target(omni_nginx_module ALL DEPENDS ${OMNI_MODULE_SO})
