// SPDX-License-Identifier: Apache-2.0
// Tests of src/approx/agent.cc (none yet).
#include <gtest/gtest.h>
