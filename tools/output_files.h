// SPDX-License-Identifier: Apache-2.0
// Publishing a command's output files: all of them or none, and never over something the user
// did not mean to replace. Every command that writes files goes through here.
//
// Before any work, CheckOutputs refuses what publishing would get wrong: an output that is not a
// regular file or a new name (a directory, a device node, a FIFO, a socket, a symbolic link: a
// rename would replace the node or the link itself), an output that is also an input, two
// outputs naming one file, and a directory that does not exist or cannot be written. Files are
// compared by identity, not by spelling: an existing file by its device and inode, a new one by
// its directory's device and inode plus its name, so `o.npy`, `./o.npy` and a hard link of it are
// one file.
//
// PublishNpy then writes each output to a temporary file of its own in the destination's
// directory (a random name created with O_EXCL | O_NOFOLLOW, so nothing planted there is
// followed or reused), fsyncs them all, checks the destinations again and only then renames them
// into place. A new file gets mode 0644 less the umask; a replaced file keeps its permission bits.
// On any failure every temporary file is removed and every destination is left as it was (an
// existing destination is kept under a hard link while the renames run, so a rename failing
// half-way can put the earlier ones back).
#pragma once

#include <string>
#include <vector>

#include "npy.h"

namespace tessera {
namespace cli {

// A file option of a command and what was given to it (an empty path: not given, skipped).
struct FileArg {
  std::string flag;  // "--out"
  std::string path;
};

// An output: its option, its path and the array to write there.
struct NpyOutput {
  std::string flag;
  std::string path;
  const NpyArray* array;
};

// Checks `outputs` against each other and against `inputs` (see above); false with *error
// naming the option, the path and what is wrong. Inputs that cannot be found are skipped (their
// loading reports that).
bool CheckOutputs(const std::vector<FileArg>& inputs, const std::vector<FileArg>& outputs,
                  std::string* error);

// Checks again (anything may have changed while the command ran), then writes and publishes
// every output, or none; false with *error naming the option and the path.
bool PublishNpy(const std::vector<FileArg>& inputs, const std::vector<NpyOutput>& outputs,
                std::string* error);

}  // namespace cli
}  // namespace tessera
