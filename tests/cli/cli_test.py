#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""End-to-end tests of the `tessera` command-line tool (python3 standard library only).

Usage: cli_test.py PATH/TO/tessera [MODULE ...] [-k PATTERN]

Runs the test modules next to this file (test_*.py, one per command and op; all of them when
none is named) against the binary, or only the tests whose names contain PATTERN. The modules
write .npy inputs with struct, run the binary, read the outputs back and compare them with the
small fp64 references of reference.py, independent of the C++ code. ctest runs each module as
a test of its own (tools/CMakeLists.txt), so they spread over `ctest -j`.
"""
import glob
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    binary = os.path.abspath(args.pop(0))
    patterns = []
    modules = []
    while args:
        arg = args.pop(0)
        if arg == "-k" and args:
            patterns.append("*%s*" % args.pop(0))
        elif arg.startswith("test_"):
            modules.append(arg[:-3] if arg.endswith(".py") else arg)
        else:
            print("cli_test.py: unknown argument %r\n%s" % (arg, __doc__.split("\n\n")[1]),
                  file=sys.stderr)
            return 2
    if not modules:
        modules = sorted(os.path.basename(p)[:-3]
                         for p in glob.glob(os.path.join(HERE, "test_*.py")))

    sys.path.insert(0, HERE)
    import cli_util
    cli_util.BINARY = binary

    loader = unittest.TestLoader()
    if patterns:
        loader.testNamePatterns = patterns
    suite = unittest.TestSuite(loader.loadTestsFromName(m) for m in modules)
    if suite.countTestCases() == 0:
        print("cli_test.py: no tests selected", file=sys.stderr)
        return 2
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
