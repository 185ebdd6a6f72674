#include "cli_common.h"

#include <sys/resource.h>

#include <cerrno>
#include <cstdlib>
#include <iostream>
#include <limits>

namespace tessera {
namespace cli {
namespace {

// Strict integer parse: the whole string, base 10, within int64.
bool ParseInt64(const std::string& text, int64_t* value) {
  if (text.empty()) return false;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (errno != 0 || end != text.c_str() + text.size()) return false;
  *value = static_cast<int64_t>(v);
  return true;
}

}  // namespace

int Fail(const std::string& command, const std::string& message) {
  std::cerr << "tessera " << command << ": " << message << "\n";
  return kExitError;
}

bool ParseWindow(const std::string& text, int64_t* left, int64_t* right, std::string* error) {
  const size_t comma = text.find(',');
  int64_t l = 0, r = 0;
  if (comma == std::string::npos || !ParseInt64(text.substr(0, comma), &l) ||
      !ParseInt64(text.substr(comma + 1), &r)) {
    *error = "--window: expected two integers 'LEFT,RIGHT' (-1 = unbounded), got '" + text + "'";
    return false;
  }
  if (l < -1 || r < -1) {
    *error = "--window: expected each bound >= -1 (-1 = unbounded), got '" + text + "'";
    return false;
  }
  *left = l;
  *right = r;
  return true;
}

bool ParsePath(const std::string& text, Path* path, std::string* error) {
  for (Path p : {Path::kAuto, Path::kReference, Path::kGeneric, Path::kFast}) {
    if (text == PathName(p)) {
      *path = p;
      return true;
    }
  }
  *error = "--path: expected auto, reference, generic or fast, got '" + text + "'";
  return false;
}

bool ParseDType(const std::string& text, DType* dtype, std::string* error) {
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16}) {
    if (text == DTypeName(d)) {
      *dtype = d;
      return true;
    }
  }
  *error = "--dtype: expected f32, bf16 or f16, got '" + text + "'";
  return false;
}

bool ParseKVDType(const std::string& text, KVDType* dtype, std::string* error) {
  for (KVDType d : {KVDType::kF32, KVDType::kBF16, KVDType::kF16, KVDType::kInt8, KVDType::kInt4}) {
    if (text == KVDTypeName(d)) {
      *dtype = d;
      return true;
    }
  }
  *error = "--kv-dtype: expected f32, bf16, f16, int8 or int4, got '" + text + "'";
  return false;
}

bool ParseLens(const std::string& text, std::vector<int32_t>* lens, std::string* error) {
  lens->clear();
  size_t start = 0;
  while (true) {
    const size_t comma = text.find(',', start);
    const std::string item =
        text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    int64_t len = 0;
    if (!ParseInt64(item, &len) || len < 1 || len > std::numeric_limits<int32_t>::max()) {
      *error = "--lens: expected comma-separated lengths >= 1 ('L1,L2,...'), got '" + text + "'";
      return false;
    }
    lens->push_back(static_cast<int32_t>(len));
    if (comma == std::string::npos) return true;
    start = comma + 1;
  }
}

double PeakRssMiB() {
  struct rusage usage;
  if (getrusage(RUSAGE_SELF, &usage) != 0) return 0.0;
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // Linux reports KiB
}

}  // namespace cli
}  // namespace tessera
