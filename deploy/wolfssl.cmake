# wolfSSL for starttls-proxy: defines the INTERFACE target stp_wolfssl.
#
#   -DSTP_WOLFSSL=bundled  (default) wolfSSL built once by deploy/build-wolfssl.sh
#                          with AES-NI/AVX2 and assembly ECC/RSA and only the
#                          features the proxy uses, linked statically; kept in
#                          ${XDG_CACHE_HOME:-~/.cache}/starttls-proxy and reused by
#                          every later configure (any build dir, any clone).
#   -DSTP_WOLFSSL=system   Debian's libwolfssl-dev through pkg-config (no
#                          assembly: about 30x slower AES-GCM, 4x slower ECDSA).
#   -DSTP_WOLFSSL_PREFIX=DIR  with bundled: build into / use DIR instead.
# The script's environment settings (STP_WOLFSSL_SRC for a source tree or
# tarball, STP_CACHE_DIR, ...) are read from the environment of the configure.
set(STP_WOLFSSL "bundled" CACHE STRING "wolfSSL: bundled (optimized static build, cached) or system (pkg-config)")
set_property(CACHE STP_WOLFSSL PROPERTY STRINGS bundled system)
set(STP_WOLFSSL_PREFIX "" CACHE PATH "bundled wolfSSL: install prefix (empty: a keyed directory in the user's cache)")

add_library(stp_wolfssl INTERFACE)

if(STP_WOLFSSL STREQUAL "system")
  pkg_check_modules(WOLFSSL REQUIRED IMPORTED_TARGET wolfssl)
  target_link_libraries(stp_wolfssl INTERFACE PkgConfig::WOLFSSL)
  message(STATUS "wolfSSL: system ${WOLFSSL_VERSION} (pkg-config, shared; -DSTP_WOLFSSL=bundled for the optimized build)")
  return()
elseif(NOT STP_WOLFSSL STREQUAL "bundled")
  message(FATAL_ERROR "STP_WOLFSSL must be 'bundled' or 'system', not '${STP_WOLFSSL}'")
endif()

set(_stp_wolfssl_script ${CMAKE_CURRENT_LIST_DIR}/build-wolfssl.sh)
set(_stp_wolfssl_args)
if(STP_WOLFSSL_PREFIX)
  list(APPEND _stp_wolfssl_args ${STP_WOLFSSL_PREFIX})
endif()

# Where the build for this wolfSSL version, these flags and this script lives.
execute_process(
  COMMAND sh ${_stp_wolfssl_script} --print-prefix ${_stp_wolfssl_args}
  OUTPUT_VARIABLE _stp_wolfssl_prefix
  ERROR_VARIABLE _stp_wolfssl_err
  RESULT_VARIABLE _stp_wolfssl_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _stp_wolfssl_rc EQUAL 0)
  message(FATAL_ERROR "wolfSSL (bundled): deploy/build-wolfssl.sh could not find wolfSSL's source:\n"
    "${_stp_wolfssl_err}\n"
    "Use -DSTP_WOLFSSL=system for Debian's libwolfssl-dev, or set STP_WOLFSSL_SRC.")
endif()

if(NOT EXISTS ${_stp_wolfssl_prefix}/.stp-wolfssl OR NOT EXISTS ${_stp_wolfssl_prefix}/lib/libwolfssl.a)
  message(STATUS "wolfSSL: building the optimized static library into ${_stp_wolfssl_prefix} (once; 1-2 minutes on 2 cores)")
  # Output goes straight to the terminal: the script prints one line per step
  # and per compiled file, and the log's end when a step fails.
  execute_process(
    COMMAND sh ${_stp_wolfssl_script} ${_stp_wolfssl_args}
    OUTPUT_VARIABLE _stp_wolfssl_out
    RESULT_VARIABLE _stp_wolfssl_rc
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _stp_wolfssl_rc EQUAL 0)
    message(FATAL_ERROR "wolfSSL (bundled): deploy/build-wolfssl.sh failed (see above).\n"
      "Fix the cause and configure again, or use -DSTP_WOLFSSL=system for Debian's libwolfssl-dev.")
  endif()
  if(NOT _stp_wolfssl_out STREQUAL _stp_wolfssl_prefix)
    message(FATAL_ERROR "wolfSSL (bundled): built into '${_stp_wolfssl_out}', expected '${_stp_wolfssl_prefix}'")
  endif()
endif()

# Link flags the static library needs: pkg-config's (--static) and libtool's.
execute_process(
  COMMAND ${CMAKE_COMMAND} -E env PKG_CONFIG_LIBDIR=${_stp_wolfssl_prefix}/lib/pkgconfig PKG_CONFIG_PATH=
          ${PKG_CONFIG_EXECUTABLE} --static --libs wolfssl
  OUTPUT_VARIABLE _stp_wolfssl_libs
  RESULT_VARIABLE _stp_wolfssl_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _stp_wolfssl_rc EQUAL 0)
  message(FATAL_ERROR "wolfSSL (bundled): no usable wolfssl.pc in ${_stp_wolfssl_prefix}/lib/pkgconfig")
endif()
file(STRINGS ${_stp_wolfssl_prefix}/lib/libwolfssl.la _stp_wolfssl_la REGEX "^dependency_libs=")
string(REGEX REPLACE "^dependency_libs='(.*)'$" "\\1" _stp_wolfssl_la "${_stp_wolfssl_la}")
separate_arguments(_stp_wolfssl_flags UNIX_COMMAND "${_stp_wolfssl_libs} ${_stp_wolfssl_la}")
set(_stp_wolfssl_deps)
foreach(_f IN LISTS _stp_wolfssl_flags)
  if(NOT _f MATCHES "^-L" AND NOT _f STREQUAL "-lwolfssl" AND NOT _f MATCHES "\\.la$")
    list(APPEND _stp_wolfssl_deps ${_f})
  endif()
endforeach()
list(REMOVE_DUPLICATES _stp_wolfssl_deps)

# The archive by path, so the system's libwolfssl.so can never be picked up
# instead; its include dir as a system dir ahead of /usr/include, so the
# headers (and options.h) always match the library.
add_library(stp_wolfssl_static STATIC IMPORTED)
set_target_properties(stp_wolfssl_static PROPERTIES
  IMPORTED_LOCATION ${_stp_wolfssl_prefix}/lib/libwolfssl.a
  INTERFACE_INCLUDE_DIRECTORIES ${_stp_wolfssl_prefix}/include
  INTERFACE_LINK_LIBRARIES "${_stp_wolfssl_deps}")
target_link_libraries(stp_wolfssl INTERFACE stp_wolfssl_static)

# Configure again when the script changes or the cached build disappears.
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS
  ${_stp_wolfssl_script} ${_stp_wolfssl_prefix}/.stp-wolfssl)

file(STRINGS ${_stp_wolfssl_prefix}/lib/pkgconfig/wolfssl.pc _stp_wolfssl_ver REGEX "^Version:")
string(REGEX REPLACE "^Version: *" "" _stp_wolfssl_ver "${_stp_wolfssl_ver}")
message(STATUS "wolfSSL: bundled ${_stp_wolfssl_ver}, static, optimized (${_stp_wolfssl_prefix}; -DSTP_WOLFSSL=system for Debian's)")
