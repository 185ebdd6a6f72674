#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpus of the harnesses, fuzz/corpus/<harness>/ (committed; rerun after
changing a harness's input format): .npy files of every dtype the CLI reads, the mask specs of
the docs and the CLI tests with a problem they fit, and a few encoded calls of each entry point
of fuzz_validate."""
import os
import random
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def npy(descr, shape, payload, major=1, fortran=False):
    dims = ", ".join("%d" % d for d in shape) if len(shape) != 1 else "%d," % shape[0]
    header = "{'descr': '%s', 'fortran_order': %s, 'shape': (%s), }" % (
        descr, "True" if fortran else "False", dims)
    prefix = 10 if major == 1 else 12
    header += " " * ((64 - (prefix + len(header) + 1) % 64) % 64) + "\n"
    length = struct.pack("<H" if major == 1 else "<I", len(header))
    return b"\x93NUMPY" + bytes([major, 0]) + length + header.encode() + payload


def write(harness, name, data):
    folder = os.path.join(ROOT, harness)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def npy_corpus():
    f32 = struct.pack("<6f", 1.0, -2.0, 0.5, float("inf"), float("nan"), 3.0)
    write("fuzz_npy", "f32_2x3", npy("<f4", (2, 3), f32))
    write("fuzz_npy", "f32_v2", npy("<f4", (6,), f32, major=2))
    write("fuzz_npy", "f32_v3_rank4", npy("<f4", (1, 2, 3, 1), f32, major=3))
    write("fuzz_npy", "f32_rank0", npy("<f4", (), f32[:4]))
    write("fuzz_npy", "f16_4", npy("<f2", (4,), struct.pack("<4H", 0x3c00, 0xc000, 0x7c00, 0)))
    write("fuzz_npy", "u8_3x3", npy("|u1", (3, 3), bytes([1, 0, 1, 0, 1, 0, 1, 1, 0])))
    write("fuzz_npy", "bool_2x2", npy("|b1", (2, 2), bytes([1, 0, 0, 1])))
    write("fuzz_npy", "i32_tree", npy("<i4", (5,), struct.pack("<5i", -1, 0, 0, 1, 2)))
    write("fuzz_npy", "empty_0x4", npy("<f4", (0, 4), b""))
    write("fuzz_npy", "fortran_1d", npy("<f4", (2,), f32[:8], fortran=True))
    write("fuzz_npy", "f8_unsupported", npy("<f8", (1,), struct.pack("<d", 1.0)))
    write("fuzz_npy", "truncated", npy("<f4", (8,), f32))


def mask_corpus():
    # Problem bytes (fuzz_mask_spec.cc): flags, Sq, Sk, heads, head dim, call flags.
    def problem(sq, sk, heads=2, flags=0, dim=8, call=0):
        return bytes([flags, sq, sk, heads - 1, dim - 1, call])

    specs = [
        (problem(64, 64), "nbhd1d:64:8"),
        (problem(64, 64), "nbhd1d:64:8:dil=2:stride=2:causal=1"),
        (problem(32, 32), "nbhd2d:8x4:3x3"),
        (problem(64, 64), "nbhd2d:8x8:3x3:dil=2x1:stride=1x3:causal=0x1"),
        (problem(64, 64), "nbhd3d:4x4x4:3x3x3"),
        (problem(64, 64), "sigmoid:-2+nbhd2d:8x8:5x5"),
        (problem(64, 64), "sink:4:8"),
        (problem(64, 64), "sink:4:16+doc:30,34"),
        (problem(64, 64), "prefix:16"),
        (problem(64, 64), "doc:10,20,34"),
        (problem(64, 64, heads=4), "shift:16"),
        (problem(64, 64), "group-sink:16:4"),
        (problem(64, 64), "s2:16:1:2"),
        (problem(128, 128, heads=4), "s2:32:2:4"),
        (problem(128, 128), "radial:4:32:32"),
        (problem(128, 128), "radial:8:16"),
        (problem(64, 64), "select:topk=2:16x16"),
        (problem(64, 64, flags=2), "select:topk=8:32x32"),
        (problem(64, 64), "select:thr=0.5"),
        (problem(64, 64, flags=4), "block-random:0.5:16x16"),
        (problem(8, 16), "tree-chain:8"),
        (problem(8, 8), "tree:@t.npy"),
        (problem(64, 64), "block:@b.npy:16x16"),
        (problem(8, 8), "dense:@d.npy"),
        (problem(8, 8), "dense:@f.npy+sigmoid:-2"),
        (problem(8, 8, call=1 | 4), "sigmoid"),
        (problem(24, 24), "sigmoid:-1+nbhd1d:24:5"),
        (problem(64, 64), "nbhd1d:32:9223372036854775807:dil=2"),
        (problem(64, 64), "s2:16:9223372036854775807:9223372036854775807"),
        (problem(32, 32), "nbhd2d:576460752303423489x32:1x1"),
        (problem(64, 64), "select:topk=1:9223372036854775792x16"),
        (problem(64, 64), "select:topk=1e300"),
        (problem(64, 64), "s2:16:1:2+select:topk=1"),
        (problem(64, 64, call=8 | 0x30), "sink:4:8"),
    ]
    for i, (head, spec) in enumerate(specs):
        write("fuzz_mask_spec", "spec_%02d" % i, head + spec.encode())


def validate_corpus():
    # fuzz_validate.cc: the first byte picks the entry point (mod 13, or
    # one of four past 207); FuzzedDataProvider reads
    # the rest (bytes from the front, integers from the back). Zeros: the smallest valid call;
    # low bytes: mostly valid calls of small sizes; random: anything.
    rng = random.Random(17)
    for entry in range(13):
        write("fuzz_validate", "entry%02d_zeros" % entry, bytes([entry]) + bytes(160))
        low = bytes(rng.randrange(0, 120) for _ in range(400))
        write("fuzz_validate", "entry%02d_low" % entry, bytes([entry]) + low)
        anything = bytes(rng.randrange(0, 256) for _ in range(400))
        write("fuzz_validate", "entry%02d_random" % entry, bytes([entry]) + anything)
    # First bytes 208..213: the long convolutions (LongConv1D, its backward, H3Layer, its
    # backward) and the diagonal SSM (its kernel, its scan), after the 13 entry points above so
    # their seeds stay as they were.
    for entry in range(208, 214):
        for kind, body in (("zeros", bytes(160)),
                           ("low", bytes(rng.randrange(0, 120) for _ in range(400))),
                           ("random", bytes(rng.randrange(0, 256) for _ in range(400)))):
            write("fuzz_validate", "longconv%d_%s" % (entry - 208, kind), bytes([entry]) + body)


def main():
    npy_corpus()
    mask_corpus()
    validate_corpus()
    return 0


if __name__ == "__main__":
    sys.exit(main())
