// SPDX-License-Identifier: Apache-2.0
#include "approx_options.h"

#include <CLI/CLI.hpp>
#include <cmath>
#include <string>
#include <vector>

namespace tessera {
namespace cli {

namespace {

// The knobs each method reads (flag names).
struct MethodKnobs {
  ApproxMethod method;
  std::vector<std::string> flags;
};
const MethodKnobs kMethodKnobs[] = {
    {ApproxMethod::kWersa, {"--features", "--levels", "--bandwidth"}},
    {ApproxMethod::kPerformer, {"--features"}},
    {ApproxMethod::kHyper, {"--block", "--samples", "--lsh-bits", "--min-seq-len"}},
    {ApproxMethod::kAgent, {"--agents"}},
    {ApproxMethod::kRouting, {"--clusters", "--window", "--ema"}},
    {ApproxMethod::kHiLo, {"--grid", "--window", "--lofi-heads"}},
};

bool ParseGrid(const std::string& text, int64_t* h, int64_t* w, std::string* error) {
  const size_t x = text.find('x');
  auto whole = [](const std::string& s, int64_t* v) {
    if (s.empty() || s.size() > 12 || s.find_first_not_of("0123456789") != std::string::npos) {
      return false;
    }
    *v = std::stoll(s);
    return true;
  };
  if (x == std::string::npos || !whole(text.substr(0, x), h) || !whole(text.substr(x + 1), w)) {
    *error = "--grid: expected HxW (two positive integers, e.g. 128x128), got '" + text + "'";
    return false;
  }
  return true;
}

}  // namespace

void AddApproxKnobs(CLI::App* app, ApproxKnobs* k, const std::string& group) {
  auto add = [&](CLI::Option* opt) {
    opt->group(group);
    k->options.push_back(opt);
  };
  add(app->add_option("--method", k->method,
                      "approximate method: wersa, hyper, performer, agent, routing or hilo"));
  add(app->add_option("--features", k->features,
                      "wersa / performer: random features (default 256)"));
  add(app->add_option("--levels", k->levels, "wersa: Haar levels (default 2)"));
  add(app->add_option("--bandwidth", k->bandwidth, "wersa: feature bandwidth (default 1)"));
  add(app->add_option("--block", k->block, "hyper: block rows, a multiple of 16 (default 256)"));
  add(app->add_option("--samples", k->samples, "hyper: sampled keys per block (default 256)"));
  add(app->add_option("--lsh-bits", k->lsh_bits, "hyper: sortLSH projections (default 7)"));
  add(app->add_option("--min-seq-len", k->min_seq_len,
                      "hyper: exact attention at or below this length (default 4096)"));
  add(app->add_option("--clusters", k->clusters, "routing: k-means clusters (default 16)"));
  add(app->add_option("--ema", k->ema, "routing: centroid EMA rate (default 0.999)"));
  add(app->add_option("--agents", k->agents, "agent: agent tokens (default 64)"));
  add(app->add_option("--grid", k->grid,
                      "hilo: the token grid HxW (default: the most square factorization of S)"));
  add(app->add_option("--lofi-heads", k->lofi_heads, "hilo: Lo-Fi heads (default: half)"));
}

bool ApplyApproxKnobs(const ApproxKnobs& k, bool window_given, int64_t seq, int64_t heads_q,
                      ApproxParams* p, std::string* error) {
  if (k.method.empty()) {
    *error = "--method: expected wersa, hyper, performer, agent, routing or hilo";
    return false;
  }
  if (!ParseApproxMethod(k.method, &p->method)) {
    *error = "--method: expected wersa, hyper, performer, agent, routing or hilo, got '" +
             k.method + "'";
    return false;
  }
  const std::vector<std::string>* reads = nullptr;
  for (const MethodKnobs& m : kMethodKnobs) {
    if (m.method == p->method) reads = &m.flags;
  }
  std::vector<std::string> given;
  for (const CLI::Option* opt : k.options) {
    if (opt->count() > 0 && opt->get_name() != "--method") given.push_back(opt->get_name());
  }
  if (window_given) given.push_back("--window");
  for (const std::string& flag : given) {
    bool ok = false;
    for (const std::string& r : *reads) ok = ok || r == flag;
    if (!ok) {
      std::string list;
      for (const std::string& r : *reads) list += (list.empty() ? "" : ", ") + r;
      *error = flag + ": not read by --method " + k.method + " (its knobs: " + list + ")";
      return false;
    }
  }
  auto given_flag = [&](const char* flag) {
    for (const std::string& g : given) {
      if (g == flag) return true;
    }
    return false;
  };
  switch (p->method) {
    case ApproxMethod::kWersa:
      if (given_flag("--features")) p->wersa.features = k.features;
      if (given_flag("--levels")) p->wersa.levels = k.levels;
      if (given_flag("--bandwidth")) p->wersa.bandwidth = static_cast<float>(k.bandwidth);
      break;
    case ApproxMethod::kPerformer:
      if (given_flag("--features")) p->performer.features = k.features;
      break;
    case ApproxMethod::kHyper:
      if (given_flag("--block")) p->hyper.block = k.block;
      if (given_flag("--samples")) p->hyper.samples = k.samples;
      if (given_flag("--lsh-bits")) p->hyper.lsh_bits = k.lsh_bits;
      if (given_flag("--min-seq-len")) p->hyper.min_seq_len = k.min_seq_len;
      break;
    case ApproxMethod::kAgent:
      if (given_flag("--agents")) p->agent.agents = k.agents;
      break;
    case ApproxMethod::kRouting:
      if (given_flag("--clusters")) p->routing.clusters = k.clusters;
      if (window_given) p->routing.window = k.window;
      if (given_flag("--ema")) p->routing.ema = static_cast<float>(k.ema);
      break;
    case ApproxMethod::kHiLo: {
      int64_t gh = 0, gw = 0;
      if (!k.grid.empty()) {
        if (!ParseGrid(k.grid, &gh, &gw, error)) return false;
      } else {
        // The most square factorization: the largest divisor of S at most sqrt(S).
        for (int64_t d = 1; d * d <= seq; ++d) {
          if (seq % d == 0) gh = d;
        }
        gw = gh > 0 ? seq / gh : 0;
      }
      p->hilo.grid_h = gh;
      p->hilo.grid_w = gw;
      if (window_given) p->hilo.window = k.window;
      p->hilo.lofi_heads = given_flag("--lofi-heads") ? k.lofi_heads : heads_q / 2;
      break;
    }
  }
  return true;
}

std::vector<float> CentroidsFromKeys(const float* k, int64_t seq, int64_t heads_q, int64_t heads_kv,
                                     int64_t dim, int64_t clusters) {
  std::vector<float> c(static_cast<size_t>(heads_q * clusters * dim), 0.0f);
  if (seq < 1 || clusters < 1) return c;
  const int64_t group = heads_q / heads_kv;
  for (int64_t h = 0; h < heads_q; ++h) {
    for (int64_t i = 0; i < clusters; ++i) {
      // Offset by i, so that inputs periodic in the token index (the bench's peaked keys) do
      // not give every centroid the same row.
      const int64_t t = (i * seq / clusters + i) % seq;
      const float* row = k + (t * heads_kv + h / group) * dim;
      double norm = 0.0;
      for (int64_t d = 0; d < dim; ++d) norm += double(row[d]) * row[d];
      const double inv = norm > 0.0 ? 1.0 / std::sqrt(norm) : 0.0;
      float* dst = &c[static_cast<size_t>((h * clusters + i) * dim)];
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<float>(row[d] * inv);
    }
  }
  return c;
}

}  // namespace cli
}  // namespace tessera
