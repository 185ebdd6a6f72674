// SPDX-License-Identifier: Apache-2.0
// Shared test utilities, one header for the tests that use them all: the environment and
// tensors (test_tensor.h), the comparator (comparator.h) and the naive same-precision attention
// (naive_attention.h).
#pragma once

#include "comparator.h"
#include "naive_attention.h"
#include "test_tensor.h"
#include "tolerances.h"
