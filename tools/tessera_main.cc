// SPDX-License-Identifier: Apache-2.0
// The `tessera` command-line tool: run attention (forward, and backward with --dout) on .npy
// files, exact or linear, benchmark it against a baseline, and report what the machine offers.
//
//   tessera run   [--op exact|linear] --q Q.npy --k K.npy --v V.npy --out O.npy [options]
//                 [--dout DO.npy --dq DQ.npy --dk DK.npy --dv DV.npy]
//   tessera bench --op forward|backward|decode|linear --seq N [options] [--vs ...] [--json]
//   tessera info  [--json]
//
// Exit codes: 0 success, 2 any error (message on stderr). stdout carries only results.
#include <CLI/CLI.hpp>
#include <exception>
#include <iostream>
#include <new>
#include <stdexcept>
#include <string>

#include "blas_core.h"
#include "cli_common.h"
#include "tessera/version.h"

namespace {

// The command line: parses and runs the selected subcommand; *running names it once known.
int Main(int argc, char** argv, std::string* running) {
  using tessera::cli::CommandMain;
  CLI::App app("tessera " + std::string(tessera::Version()) + ": fast exact attention on CPUs",
               "tessera");
  app.set_version_flag("--version", std::string(tessera::Version()));
  app.require_subcommand(1);

  const struct {
    const char* name;
    CommandMain main;
  } commands[] = {
      {"run", tessera::cli::AddRunCommand(app)},
      {"bench", tessera::cli::AddBenchCommand(app)},
      {"info", tessera::cli::AddInfoCommand(app)},
  };

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e, std::cout, std::cerr);
    return code == 0 ? tessera::cli::kExitOk : tessera::cli::kExitError;
  }
  for (const auto& command : commands) {
    if (!app.got_subcommand(command.name)) continue;
    *running = command.name;
    std::string error;
    if (!tessera::cli::RefuseEmptyValues(*app.get_subcommand(command.name), &error)) {
      return tessera::cli::Fail(command.name, error);
    }
    return command.main();
  }
  return tessera::cli::kExitError;  // unreachable: require_subcommand(1)
}

}  // namespace

int main(int argc, char** argv) {
  // Before any BLAS call: a generic OpenBLAS core would slow the naive baseline several-fold.
  tessera::cli::ForceBlasCoreIfWeak(argc, argv);
  // Whatever escapes a command (an allocation the sizes did not rule out, a library throwing)
  // ends the process with a message and the error exit code, not an abort.
  std::string running;
  const auto fail = [&](const std::string& message) {
    std::cerr << "tessera" << (running.empty() ? "" : " " + running) << ": " << message << "\n";
    return tessera::cli::kExitError;
  };
  try {
    return Main(argc, argv, &running);
  } catch (const std::bad_alloc& e) {
    return fail(std::string("cannot allocate memory (") + e.what() +
                "); expected a problem that fits in memory");
  } catch (const std::length_error& e) {
    return fail(std::string("cannot allocate memory: a size is too large (") + e.what() + ")");
  } catch (const std::exception& e) {
    return fail(std::string("unexpected error: ") + e.what());
  } catch (...) {
    return fail("unexpected error");
  }
}
