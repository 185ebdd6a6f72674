// SPDX-License-Identifier: Apache-2.0
// Tests of src/approx/hyper_attention.cc (none yet).
#include <gtest/gtest.h>
