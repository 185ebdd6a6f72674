// placeholder until the CLI helper writes it
#include "tessera/system.h"
