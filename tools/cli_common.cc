// SPDX-License-Identifier: Apache-2.0
#include "cli_common.h"

#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <limits>

#include "tessera/system.h"

namespace tessera {
namespace cli {
namespace {

// Strict integer parse: the whole string, base 10, within int64; no sign but '-', no spaces.
bool ParseInt64(const std::string& text, int64_t* value) {
  if (text.empty() || !(text[0] == '-' || std::isdigit(static_cast<unsigned char>(text[0])))) {
    return false;
  }
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

bool RefuseEmptyValues(const CLI::App& command, std::string* error) {
  for (const CLI::Option* opt : command.get_options()) {
    if (opt->get_type_size() == 0) continue;  // a flag: no value
    for (const std::string& value : opt->results()) {
      if (value.empty()) {
        // get_name() is empty for a hidden option (--path): its long name instead.
        const std::string name =
            opt->get_lnames().empty() ? opt->get_name() : "--" + opt->get_lnames()[0];
        *error = name + ": expected a value, got ''";
        return false;
      }
    }
  }
  return true;
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

int32_t MaxThreads() {
  return static_cast<int32_t>(std::min<int64_t>(
      kMaxThreads, int64_t{kMaxThreadsPerHardwareThread} * std::max(HardwareThreads(), 1)));
}

bool CheckThreads(int32_t threads, std::string* error) {
  if (threads < 0) {
    *error = "--threads: expected >= 0 (0 = all), got " + std::to_string(threads);
    return false;
  }
  if (threads > MaxThreads()) {
    *error = "--threads: expected at most " + std::to_string(MaxThreads()) + " (" +
             std::to_string(kMaxThreadsPerHardwareThread) + " per hardware thread, up to " +
             std::to_string(kMaxThreads) + "; 0 = all), got " + std::to_string(threads);
    return false;
  }
  return true;
}

bool ApplySimdTarget(const std::string& name, std::string* error) {
  const Status status = SetSimdTarget(name);
  if (status.ok()) return true;
  *error = "--target: " + status.ToString();
  return false;
}

std::string SimdTargetHelp() {
  std::string names;
  for (const std::string& name : CompiledSimdTargets()) names += name + ", ";
  return "force a SIMD target: one of " + names +
         "or auto (the best this CPU runs; `tessera info` lists them)";
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

bool GradientFiles(const std::string& dout, const std::string& dq, const std::string& dk,
                   const std::string& dv, bool* backward, std::string* error) {
  const struct {
    const char* flag;
    const std::string& file;
  } flags[] = {{"--dout", dout}, {"--dq", dq}, {"--dk", dk}, {"--dv", dv}};
  std::string given, missing;
  for (const auto& f : flags) {
    std::string& list = f.file.empty() ? missing : given;
    list += (list.empty() ? "" : ", ") + std::string(f.flag);
  }
  *backward = missing.empty();
  if (!*backward && !given.empty()) {
    *error = "the backward needs --dout, --dq, --dk and --dv together; got " + given + " without " +
             missing;
    return false;
  }
  return true;
}

bool ParseNonNegative(const std::string& flag, const std::string& text, int64_t* value,
                      std::string* error) {
  int64_t v = 0;
  if (!ParseInt64(text, &v) || v < 0) {
    *error = flag + ": expected an integer >= 0, got '" + text + "'";
    return false;
  }
  *value = v;
  return true;
}

namespace {

constexpr struct {
  LinearVariant variant;
  const char* name;
} kVariants[] = {{LinearVariant::kPlain, "plain"},
                 {LinearVariant::kDecay, "decay"},
                 {LinearVariant::kGla, "gla"},
                 {LinearVariant::kBased, "based"}};

constexpr struct {
  LinearFeatureMap map;
  const char* name;
} kFeatureMaps[] = {{LinearFeatureMap::kIdentity, "identity"},
                    {LinearFeatureMap::kElu1, "elu1"},
                    {LinearFeatureMap::kRelu, "relu"},
                    {LinearFeatureMap::kTaylor2, "taylor2"}};

}  // namespace

const char* LinearVariantName(LinearVariant variant) {
  for (const auto& v : kVariants) {
    if (v.variant == variant) return v.name;
  }
  return "?";
}

const char* FeatureMapName(LinearFeatureMap map) {
  for (const auto& m : kFeatureMaps) {
    if (m.map == map) return m.name;
  }
  return "?";
}

bool ResolveLinearOptions(const LinearOptionText& text, LinearChoice* choice, std::string* error) {
  LinearChoice c;
  bool found = false;
  for (const auto& v : kVariants) {
    if (text.variant == v.name) {
      c.variant = v.variant;
      found = true;
    }
  }
  if (!found) {
    *error = "--variant: expected plain, decay, gla or based, got '" + text.variant + "'";
    return false;
  }
  const bool based = c.variant == LinearVariant::kBased;
  c.feature_map = based ? LinearFeatureMap::kTaylor2 : LinearFeatureMap::kIdentity;
  if (!text.feature_map.empty()) {
    found = false;
    for (const auto& m : kFeatureMaps) {
      if (text.feature_map == m.name) {
        c.feature_map = m.map;
        found = true;
      }
    }
    if (!found) {
      *error =
          "--feature-map: expected identity, elu1, relu or taylor2, got '" + text.feature_map + "'";
      return false;
    }
    // The library would reject these too, but only the CLI knows which flag chose the map.
    if (based && c.feature_map != LinearFeatureMap::kTaylor2) {
      *error = "--feature-map: --variant based uses the Taylor map (taylor2), got '" +
               text.feature_map + "'";
      return false;
    }
    if (c.variant == LinearVariant::kGla && c.feature_map != LinearFeatureMap::kIdentity) {
      *error =
          "--feature-map: --variant gla gates the keys' channels, so it takes the identity "
          "map only, got '" +
          text.feature_map + "'";
      return false;
    }
  }
  c.normalize = text.normalize < 0 ? based : text.normalize == 1;
  c.window = based ? kBasedWindow : 0;
  if (!text.window.empty()) {
    int64_t w = 0;
    if (!ParseInt64(text.window, &w) || w < 0) {
      *error =
          "--window: expected the exact window's length W >= 0 in keys (0 = off) with --op "
          "linear, got '" +
          text.window + "'";
      return false;
    }
    c.window = w;
  }
  *choice = c;
  return true;
}

bool ParseLinearForm(const std::string& text, bool* recurrent, std::string* error) {
  if (text == "chunked" || text == "recurrent") {
    *recurrent = text == "recurrent";
    return true;
  }
  *error = "--form: expected chunked or recurrent, got '" + text + "'";
  return false;
}

bool ParseDecay(const std::string& text, std::vector<float>* lambdas, std::string* error) {
  lambdas->clear();
  size_t start = 0;
  while (true) {
    const size_t comma = text.find(',', start);
    const std::string item =
        text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    errno = 0;
    char* end = nullptr;
    // strtod alone would skip leading spaces and take hexadecimal: a decimal number only.
    const bool decimal = !item.empty() &&
                         item.find_first_not_of("0123456789.eE+-") == std::string::npos &&
                         item[0] != '+';
    const double x = decimal ? std::strtod(item.c_str(), &end) : 0.0;
    if (!decimal || errno != 0 || end != item.c_str() + item.size() || !std::isfinite(x)) {
      *error =
          "--decay: expected comma-separated decay rates 'L1,L2,...' in (0, 1], got '" + text + "'";
      return false;
    }
    // (0, 1] as the library requires; a rate that rounds to 0 in f32 is out of range too.
    const float lambda = static_cast<float>(x);
    if (!(lambda > 0.0f && lambda <= 1.0f)) {
      *error = "--decay: expected each decay rate in (0, 1], got " + item + " in '" + text + "'";
      return false;
    }
    lambdas->push_back(lambda);
    if (comma == std::string::npos) return true;
    start = comma + 1;
  }
}

std::string LinearStatusMessage(const Status& status) {
  static constexpr struct {
    const char* field;
    const char* flag;
  } kFields[] = {
      {"chunk_size", "--chunk"},
      {"prefix_len", "--prefix"},
      {"window", "--window"},
      {"decay", "--decay"},
      {"gates", "--gates"},
      {"initial_state", "--state-in"},
      {"initial_normalizer", "--normalizer-in"},
      {"final_state", "--state-out"},
      {"final_normalizer", "--normalizer-out"},
      {"scale", "--scale"},
      {"dgates", "--dgates"},
      {"dout", "--dout"},
      {"causal", "--non-causal"},
      {"normalize", "--normalize"},
      {"feature_map", "--feature-map"},
      {"ctx.path", "--path"},
  };
  const std::string& m = status.message();
  for (const auto& f : kFields) {
    const std::string field = f.field;
    if (m.compare(0, field.size(), field) == 0 &&
        (m.size() == field.size() || m[field.size()] == ':' || m[field.size()] == ' ' ||
         m[field.size()] == '.' || m[field.size()] == '[' || m[field.size()] == ',')) {
      return std::string(f.flag) + ": " + status.ToString();
    }
  }
  return status.ToString();
}

double PeakRssMiB() {
  struct rusage usage;
  if (getrusage(RUSAGE_SELF, &usage) != 0) return 0.0;
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // Linux reports KiB
}

}  // namespace cli
}  // namespace tessera
