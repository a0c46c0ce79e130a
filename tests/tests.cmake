# Test registration, included from the top-level CMakeLists.txt.

# Unit tests: one executable per tests/unit/test_*.c, linked with stp_relay
# (stp_io, stp_core, libuv and wolfSSL with it).
file(GLOB STP_UNIT_TESTS CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/tests/unit/test_*.c)
foreach(src ${STP_UNIT_TESTS})
  get_filename_component(name ${src} NAME_WE)
  add_executable(${name} ${src})
  target_link_libraries(${name} PRIVATE stp_relay)
  add_test(NAME unit_${name} COMMAND ${name})
endforeach()

# Integration tests: each tests/integration/test_*.py runs the real daemon
# (STP_BIN) against real peers, with Debian's python3 and pytest.
if(STP_INTEGRATION_TESTS)
  # An allocation-failure shim the tests preload into the daemon.
  add_library(stp_failalloc SHARED tests/support/failalloc.c)
  file(GLOB STP_INTEGRATION CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/tests/integration/test_*.py)
  foreach(py ${STP_INTEGRATION})
    get_filename_component(name ${py} NAME_WE)
    add_test(NAME integration_${name}
      COMMAND /usr/bin/python3 -m pytest -q -p no:cacheprovider ${py})
    set_tests_properties(integration_${name} PROPERTIES
      ENVIRONMENT "STP_BIN=$<TARGET_FILE:starttls-proxy>;STP_FAILALLOC=$<TARGET_FILE:stp_failalloc>"
      TIMEOUT 600)
  endforeach()
endif()

# Deployment tests (container image, pod, systemd unit): tests/deploy/test_*.py,
# slower; -DSTP_DEPLOY_TESTS=OFF leaves them out.
option(STP_DEPLOY_TESTS "Register the deployment tests with ctest" ON)
if(STP_INTEGRATION_TESTS AND STP_DEPLOY_TESTS)
  file(GLOB STP_DEPLOY CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/tests/deploy/test_*.py)
  foreach(py ${STP_DEPLOY})
    get_filename_component(name ${py} NAME_WE)
    add_test(NAME deploy_${name}
      COMMAND /usr/bin/python3 -m pytest -q -p no:cacheprovider ${py})
    set_tests_properties(deploy_${name} PROPERTIES
      ENVIRONMENT "STP_BIN=$<TARGET_FILE:starttls-proxy>;STP_SOURCE_DIR=${CMAKE_CURRENT_SOURCE_DIR}"
      TIMEOUT 1800 LABELS deploy)
  endforeach()
endif()

# Fuzz targets (clang -fsanitize=fuzzer): built with -DSTP_FUZZ=ON, each
# registered as a short bounded run over its seed corpus.
if(STP_FUZZ)
  file(GLOB STP_FUZZERS CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/tests/fuzz/fuzz_*.c)
  foreach(src ${STP_FUZZERS})
    get_filename_component(name ${src} NAME_WE)
    add_executable(${name} ${src} ${STP_CORE_SOURCES})
    target_include_directories(${name} PRIVATE include)
    target_compile_options(${name} PRIVATE -fsanitize=fuzzer,address,undefined)
    target_link_options(${name} PRIVATE -fsanitize=fuzzer,address,undefined)
    target_link_libraries(${name} PRIVATE PkgConfig::INIH)
    # New inputs go to the first directory (in the build tree); the seed
    # corpus in the source tree is only read.
    set(corpus ${CMAKE_CURRENT_SOURCE_DIR}/tests/fuzz/corpus/${name})
    set(work ${CMAKE_CURRENT_BINARY_DIR}/fuzz-corpus/${name})
    file(MAKE_DIRECTORY ${work})
    set(dict smtp.dict)
    if(name STREQUAL "fuzz_config")
      set(dict config.dict)
    elseif(name STREQUAL "fuzz_proxy_header")
      set(dict proxy_header.dict)
    elseif(name STREQUAL "fuzz_http")
      set(dict http.dict)
    elseif(name STREQUAL "fuzz_imap")
      set(dict imap.dict)
    elseif(name STREQUAL "fuzz_pop3")
      set(dict pop3.dict)
    endif()
    add_test(NAME fuzz_${name}
      COMMAND ${name} -max_total_time=30 -timeout=5
              -dict=${CMAKE_CURRENT_SOURCE_DIR}/tests/fuzz/${dict} ${work} ${corpus})
  endforeach()
endif()
