# SPDX-License-Identifier: Apache-2.0
"""tessera.KVFile / KVFileWriter / save_kv_file (include/tessera/kv_file.h): decode streamed from
a file equals tessera.decode over the same in-RAM cache, the writer equals save_kv_file byte for
byte, and bad files are ValueErrors naming the path."""
import os

import numpy as np
import pytest

import tessera
from conftest import randn


def build(rng, dtype, n, Hkv=2, D=64, page_size=16):
    cache = tessera.KVCache(1, Hkv, D, n, dtype=dtype, page_size=page_size)
    k, v = randn(rng, (1, n, Hkv, D)), randn(rng, (1, n, Hkv, D))
    cache.append(k, v)
    return cache, k, v


@pytest.mark.parametrize("dtype", ["f16", "int4"])
@pytest.mark.parametrize("reader", ["auto", "threads"])
def test_decode_matches_in_ram(tmp_path, dtype, reader):
    rng = np.random.default_rng(0)
    cache, _, _ = build(rng, dtype, 301)
    path = tmp_path / "c.kv"
    tessera.save_kv_file(cache, path)
    f = tessera.KVFile(path)
    assert (f.dtype, f.tokens, f.num_kv_heads, f.head_dim, f.page_size) == (dtype, 301, 2, 64, 16)
    assert f.file_bytes == os.path.getsize(path)
    q = randn(rng, (1, 3, 4, 64))
    want, want_lse = tessera.decode(q, cache, causal=True, return_lse=True)
    got, lse, stats = f.decode(q, causal=True, chunk_tokens=64, reader=reader, return_lse=True,
                               return_stats=True)
    assert stats["chunks"] == 5
    if reader == "threads":
        assert stats["reader"] == "threads"
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=2e-5)
    _, stats = f.decode(q, causal=True, chunk_tokens=64, select_top_k=1, return_stats=True)
    assert stats["chunks_read"] == [4] and stats["chunks_total"] == 5  # the last chunk alone


def test_writer_equals_save(tmp_path):
    rng = np.random.default_rng(1)
    cache, k, v = build(rng, "int8", 100)
    tessera.save_kv_file(cache, tmp_path / "saved.kv")
    with tessera.KVFileWriter(tmp_path / "w.kv", dtype="int8", num_kv_heads=2, head_dim=64,
                              capacity=100, page_size=16) as w:
        w.append(k, v)  # the first append calibrates, as the cache's did
        assert w.tokens == 100
    assert (tmp_path / "w.kv").read_bytes() == (tmp_path / "saved.kv").read_bytes()


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="missing.kv"):
        tessera.KVFile(tmp_path / "missing.kv")
    bad = tmp_path / "bad.kv"
    bad.write_bytes(b"\0" * 5000)
    with pytest.raises(ValueError, match="magic"):
        tessera.KVFile(bad)
    rng = np.random.default_rng(2)
    cache, _, _ = build(rng, "f16", 40)
    good = tmp_path / "good.kv"
    tessera.save_kv_file(cache, good)
    data = good.read_bytes()
    bad.write_bytes(data[:-4096])
    with pytest.raises(ValueError, match="truncated"):
        tessera.KVFile(bad)
    f = tessera.KVFile(good)
    with pytest.raises(ValueError, match="reader"):
        f.decode(randn(rng, (1, 1, 4, 64)), reader="mmap")
