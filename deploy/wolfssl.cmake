# wolfSSL for starttls-proxy: defines the target stp_wolfssl.
# Today: the system package (libwolfssl-dev) found with pkg-config.
pkg_check_modules(WOLFSSL REQUIRED IMPORTED_TARGET wolfssl)
add_library(stp_wolfssl INTERFACE)
target_link_libraries(stp_wolfssl INTERFACE PkgConfig::WOLFSSL)
