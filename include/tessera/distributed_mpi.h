// SPDX-License-Identifier: Apache-2.0
// tessera: the MPI communicator of the sequence-parallel drivers (tessera/distributed.h). Built
// when CMake finds MPI (option TESSERA_MPI; library tessera::tessera_mpi).
//
// The communicator duplicates the given MPI communicator (so its traffic never matches the
// caller's) and, when MPI was initialized with MPI_THREAD_SERIALIZED or more, runs every MPI call
// on one worker thread of its own, in the order the driver started them: exchanges then progress
// while the driver computes (the ring's overlap). With a lower thread level the calls run on the
// caller's thread when it waits, and nothing overlaps. MakeMpiCommunicator is collective over
// `comm` (MPI_Comm_dup); destroy the communicator before MPI_Finalize.
#pragma once

#include <mpi.h>

#include <memory>

#include "tessera/distributed.h"

namespace tessera {

std::unique_ptr<Communicator> MakeMpiCommunicator(MPI_Comm comm);

// The thread level MPI_Init_thread should ask for so that communication overlaps compute.
constexpr int kMpiThreadLevelForOverlap = MPI_THREAD_SERIALIZED;

}  // namespace tessera
