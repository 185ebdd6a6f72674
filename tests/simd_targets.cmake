# SPDX-License-Identifier: Apache-2.0
# Read by ctest (TEST_INCLUDE_FILES, see CMakeLists.txt): registers simd_target_<name> for every
# SIMD target tessera_tests compiled except the one this CPU runs by default (the plain entries
# run that one). Inputs: TESSERA_TEST_EXE, and TESSERA_SIMD_FILTER_<name> (else _OTHER), the gtest
# filter of each target.
if(NOT EXISTS "${TESSERA_TEST_EXE}")
  return()  # not built yet: the plain entries report that
endif()
execute_process(COMMAND "${TESSERA_TEST_EXE}" --tessera_list_simd_targets
  OUTPUT_VARIABLE _out RESULT_VARIABLE _rc TIMEOUT 120)
if(NOT _rc EQUAL 0)
  # Fails visibly instead of silently registering no target.
  add_test(simd_target_list "${TESSERA_TEST_EXE}" --tessera_list_simd_targets)
  return()
endif()
string(REGEX MATCH "compiled ([^\n]*)" _ "${_out}")
string(REPLACE " " ";" _compiled "${CMAKE_MATCH_1}")
string(REGEX MATCH "default ([^\n]*)" _ "${_out}")
set(_default "${CMAKE_MATCH_1}")
foreach(_target IN LISTS _compiled)
  if(_target STREQUAL _default)
    continue()
  endif()
  set(_filter "${TESSERA_SIMD_FILTER_OTHER}")
  if(DEFINED TESSERA_SIMD_FILTER_${_target})
    set(_filter "${TESSERA_SIMD_FILTER_${_target}}")
  endif()
  add_test(simd_target_${_target} "${TESSERA_TEST_EXE}" "--gtest_filter=${_filter}" --gtest_brief=1)
  set_tests_properties(simd_target_${_target} PROPERTIES
    ENVIRONMENT "TESSERA_TEST_TARGET=${_target};TESSERA_SMALL_TESTS=1"
    SKIP_REGULAR_EXPRESSION "SKIPPED: TESSERA_TEST_TARGET"
    LABELS simd_target)
endforeach()
