// Shared pieces of the `tessera` command-line tool: exit codes, error reporting, option parsing
// helpers and process measurements. Each subcommand lives in its own cmd_*.cc and registers
// itself through a Add*Command function, so new subcommands and ops slot in without touching
// the others.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tessera/context.h"
#include "tessera/kv_cache.h"
#include "tessera/types.h"

namespace CLI {
class App;
}  // namespace CLI

namespace tessera {
namespace cli {

constexpr int kExitOk = 0;
constexpr int kExitError = 2;  // bad arguments, unreadable files, tessera errors

// Prints "tessera <command>: <message>" to stderr and returns kExitError.
int Fail(const std::string& command, const std::string& message);

// A subcommand's entry point, run after parsing when that subcommand was selected.
using CommandMain = std::function<int()>;

// Register the subcommands; each returns the function to run when it is selected.
CommandMain AddRunCommand(CLI::App& app);
CommandMain AddBenchCommand(CLI::App& app);
CommandMain AddInfoCommand(CLI::App& app);

// Parses "L,R" (each an integer >= -1) into *left, *right; false with *error set otherwise.
bool ParseWindow(const std::string& text, int64_t* left, int64_t* right, std::string* error);

// Parses "auto", "reference", "generic" or "fast".
bool ParsePath(const std::string& text, Path* path, std::string* error);

// Parses "f32", "bf16" or "f16".
bool ParseDType(const std::string& text, DType* dtype, std::string* error);

// Parses "f32", "bf16", "f16", "int8" or "int4" (the --kv-dtype option).
bool ParseKVDType(const std::string& text, KVDType* dtype, std::string* error);

// Parses "L1,L2,..." (each an integer in 1..2^31-1) into *lens (the --lens option).
bool ParseLens(const std::string& text, std::vector<int32_t>* lens, std::string* error);

// Peak resident set size of this process so far, in MiB.
double PeakRssMiB();

}  // namespace cli
}  // namespace tessera
