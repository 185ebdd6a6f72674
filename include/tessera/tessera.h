// tessera: umbrella header.
#pragma once

#include "tessera/attention.h"
#include "tessera/context.h"
#include "tessera/status.h"
#include "tessera/types.h"
#include "tessera/version.h"
