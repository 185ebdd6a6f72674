# SPDX-License-Identifier: Apache-2.0
# Checks that the first ```cpp block of README.md is exactly examples/basic_forward.cc, so the
# example a user copies is the one CI compiles and runs. Needs SOURCE_DIR.
file(READ "${SOURCE_DIR}/README.md" readme)
file(READ "${SOURCE_DIR}/examples/basic_forward.cc" example)
string(FIND "${readme}" "```cpp\n" start)
if(start EQUAL -1)
  message(FATAL_ERROR "README.md has no ```cpp block")
endif()
math(EXPR start "${start} + 7")
string(SUBSTRING "${readme}" ${start} -1 rest)
string(FIND "${rest}" "```" stop)
string(SUBSTRING "${rest}" 0 ${stop} block)
if(NOT block STREQUAL example)
  message(FATAL_ERROR "README.md's C++ example differs from examples/basic_forward.cc")
endif()
