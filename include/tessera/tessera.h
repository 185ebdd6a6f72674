// SPDX-License-Identifier: Apache-2.0
// tessera: umbrella header.
#pragma once

#include "tessera/approx.h"
#include "tessera/attention.h"
#include "tessera/context.h"
#include "tessera/decode.h"
#include "tessera/distributed.h"
#include "tessera/kv_cache.h"
#include "tessera/kv_file.h"
#include "tessera/kv_policy.h"
#include "tessera/linear.h"
#include "tessera/longconv.h"
#include "tessera/mask.h"
#include "tessera/merge.h"
#include "tessera/status.h"
#include "tessera/system.h"
#include "tessera/types.h"
#include "tessera/version.h"
#include "tessera/vision.h"
