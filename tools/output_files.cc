// SPDX-License-Identifier: Apache-2.0
#include "output_files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>

namespace tessera {
namespace cli {
namespace {

// How much of the destination's name a temporary name keeps (names are at most 255 bytes).
constexpr size_t kMaxNameInTemp = 128;
// Random names to try before giving up (each collision is a 62^12 chance).
constexpr int kNameAttempts = 100;
constexpr size_t kMaxWrite = size_t{1} << 30;

std::string Quoted(const std::string& s) { return "'" + s + "'"; }

const char* FileKind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISLNK(mode)) return "a symbolic link";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  return "a special file";
}

bool SameInode(const struct stat& a, const struct stat& b) {
  return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

// Where an output lands, and what is there now.
struct Destination {
  const FileArg* arg = nullptr;
  std::string dir;   // as given ("." when the path has no directory)
  std::string name;  // the last component
  struct stat dir_stat = {};
  bool exists = false;
  struct stat file_stat = {};  // lstat of the path, when it exists
};

// One file when both exist with one inode (hard links too), or when they are one name in one
// directory.
bool SameFile(const Destination& a, const Destination& b) {
  if (a.exists && b.exists) return SameInode(a.file_stat, b.file_stat);
  return SameInode(a.dir_stat, b.dir_stat) && a.name == b.name;
}

bool Inspect(const FileArg& arg, Destination* d, std::string* error) {
  const std::string& path = arg.path;
  const size_t slash = path.rfind('/');
  d->arg = &arg;
  d->dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  d->name = slash == std::string::npos ? path : path.substr(slash + 1);
  if (d->name.empty() || d->name == "." || d->name == "..") {
    *error = arg.flag + ": expected a file name to write, got " + Quoted(path);
    return false;
  }
  auto cannot_write = [&](const std::string& why) {
    *error = arg.flag + ": cannot write " + Quoted(path) + ": " + why;
    return false;
  };
  if (stat(d->dir.c_str(), &d->dir_stat) != 0) {
    return cannot_write("directory " + Quoted(d->dir) + ": " + std::strerror(errno));
  }
  if (!S_ISDIR(d->dir_stat.st_mode)) {
    return cannot_write(Quoted(d->dir) + " is not a directory");
  }
  if (access(d->dir.c_str(), W_OK | X_OK) != 0) {
    return cannot_write("directory " + Quoted(d->dir) + ": " + std::strerror(errno));
  }
  if (lstat(path.c_str(), &d->file_stat) == 0) {
    d->exists = true;
    if (!S_ISREG(d->file_stat.st_mode)) {
      // A rename would replace the node itself (or the link, not its target).
      *error = arg.flag + ": expected a regular file or a new name, got " + Quoted(path) +
               ", which is not a regular file but " + FileKind(d->file_stat.st_mode) +
               (S_ISLNK(d->file_stat.st_mode)
                    ? " (outputs are renamed into place, which would replace the link, not its "
                      "target)"
                    : "");
      return false;
    }
  } else if (errno != ENOENT) {
    return cannot_write(std::strerror(errno));
  }
  return true;
}

// Inspects every given output and checks them against the inputs and each other.
bool InspectAll(const std::vector<FileArg>& inputs, const std::vector<FileArg>& outputs,
                std::vector<Destination>* dests, std::string* error) {
  dests->clear();
  dests->reserve(outputs.size());
  for (const FileArg& out : outputs) {
    if (out.path.empty()) continue;
    Destination d;
    if (!Inspect(out, &d, error)) return false;
    if (d.exists) {
      for (const FileArg& in : inputs) {
        struct stat in_stat;
        if (in.path.empty() || stat(in.path.c_str(), &in_stat) != 0) continue;
        if (SameInode(in_stat, d.file_stat)) {
          *error = out.flag + ": expected a file other than the inputs, got " + Quoted(out.path) +
                   ", the file of " + in.flag + " (" + Quoted(in.path) + ")";
          return false;
        }
      }
    }
    for (const Destination& earlier : *dests) {
      if (SameFile(earlier, d)) {
        *error = earlier.arg->flag + " and " + out.flag + ": expected different files, got " +
                 Quoted(earlier.arg->path) + " and " + Quoted(out.path) + ", the same file";
        return false;
      }
    }
    dests->push_back(d);
  }
  return true;
}

// `dir`/.`name`.`tag`-XXXXXXXXXXXX with 12 random letters and digits.
std::string RandomName(const Destination& d, const char* tag) {
  static constexpr char kChars[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  std::random_device random;
  std::string name = "." + d.name.substr(0, kMaxNameInTemp) + "." + tag + "-";
  for (int i = 0; i < 12; ++i) name.push_back(kChars[random() % (sizeof(kChars) - 1)]);
  return (d.dir == "/" ? "" : d.dir) + "/" + name;
}

// Creates a new temporary file next to d; its descriptor in *fd, its path in *path.
bool CreateTemp(const Destination& d, std::string* path, int* fd, std::string* why) {
  for (int attempt = 0; attempt < kNameAttempts; ++attempt) {
    *path = RandomName(d, "tmp");
    *fd = open(path->c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (*fd >= 0) return true;
    if (errno != EEXIST) break;
  }
  *why = std::string("cannot create a temporary file in ") + Quoted(d.dir) + ": " +
         std::strerror(errno);
  path->clear();
  return false;
}

bool WriteAll(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t got = write(fd, p, std::min(n, kMaxWrite));
    if (got < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += got;
    n -= static_cast<size_t>(got);
  }
  return true;
}

// Writes the whole .npy file of `array` to a new temporary file next to d.
bool WriteTemp(const Destination& d, const NpyArray& array, std::string* temp, std::string* why) {
  std::string head;
  if (!NpyHeader(array.dtype, array.shape, &head, why)) return false;
  int fd = -1;
  if (!CreateTemp(d, temp, &fd, why)) return false;
  // A replaced file keeps its permission bits; a new one has 0644 less the umask.
  bool ok = !d.exists || fchmod(fd, d.file_stat.st_mode & 07777) == 0;
  ok = ok && WriteAll(fd, head.data(), head.size()) &&
       WriteAll(fd, array.data.get(), array.nbytes()) && fsync(fd) == 0;
  if (!ok) *why = std::strerror(errno);
  if (close(fd) != 0 && ok) {
    *why = std::strerror(errno);
    ok = false;
  }
  return ok;
}

// A second name for an existing destination, to put it back if a later rename fails; empty
// when the file system has no hard links (then a failed rename cannot be undone for it).
std::string Backup(const Destination& d) {
  for (int attempt = 0; attempt < kNameAttempts; ++attempt) {
    const std::string path = RandomName(d, "old");
    if (link(d.arg->path.c_str(), path.c_str()) == 0) return path;
    if (errno != EEXIST) break;
  }
  return "";
}

void SyncDirectory(const std::string& dir) {
  const int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  fsync(fd);  // best effort: the files themselves are already on disk
  close(fd);
}

}  // namespace

bool CheckOutputs(const std::vector<FileArg>& inputs, const std::vector<FileArg>& outputs,
                  std::string* error) {
  std::vector<Destination> dests;
  return InspectAll(inputs, outputs, &dests, error);
}

bool PublishNpy(const std::vector<FileArg>& inputs, const std::vector<NpyOutput>& outputs,
                std::string* error) {
  std::vector<FileArg> args;
  std::vector<const NpyArray*> arrays;
  for (const NpyOutput& o : outputs) {
    if (o.path.empty()) continue;
    args.push_back({o.flag, o.path});
    arrays.push_back(o.array);
  }
  std::vector<Destination> dests;
  if (!InspectAll(inputs, args, &dests, error)) return false;

  const size_t n = dests.size();
  std::vector<std::string> temps(n), backups(n);
  auto remove_all = [&] {
    for (std::vector<std::string>* files : {&temps, &backups}) {
      for (std::string& f : *files) {
        if (!f.empty()) unlink(f.c_str());
        f.clear();
      }
    }
  };
  for (size_t i = 0; i < n; ++i) {
    std::string why;
    if (!WriteTemp(dests[i], *arrays[i], &temps[i], &why)) {
      remove_all();
      *error = args[i].flag + ": cannot write " + Quoted(args[i].path) + ": " + why;
      return false;
    }
  }

  // Anything may have changed while the files were written: look again just before renaming.
  std::vector<Destination> now;
  if (!InspectAll(inputs, args, &now, error)) {
    remove_all();
    return false;
  }
  for (size_t i = 0; i < n; ++i) {
    if (now[i].exists) backups[i] = Backup(now[i]);
  }
  for (size_t i = 0; i < n; ++i) {
    if (rename(temps[i].c_str(), args[i].path.c_str()) == 0) {
      temps[i].clear();
      continue;
    }
    const std::string why = std::strerror(errno);
    // Put back what the earlier renames replaced, and remove what they created; a backup that
    // cannot be renamed back stays, and is named.
    std::string lost;
    for (size_t j = 0; j < i; ++j) {
      if (!now[j].exists) {
        if (unlink(args[j].path.c_str()) != 0) lost += "; " + args[j].flag + " was written";
      } else if (backups[j].empty() || rename(backups[j].c_str(), args[j].path.c_str()) != 0) {
        lost += "; " + args[j].flag + " was replaced" +
                (backups[j].empty() ? "" : " (its old contents are in " + Quoted(backups[j]) + ")");
      }
      backups[j].clear();
    }
    remove_all();
    *error = args[i].flag + ": cannot write " + Quoted(args[i].path) + ": " + why +
             (lost.empty() ? "; no output was changed" : lost);
    return false;
  }
  remove_all();  // the backups
  for (size_t i = 0; i < n; ++i) {
    bool seen = false;
    for (size_t j = 0; j < i; ++j) seen = seen || SameInode(dests[j].dir_stat, dests[i].dir_stat);
    if (!seen) SyncDirectory(dests[i].dir);
  }
  return true;
}

}  // namespace cli
}  // namespace tessera
