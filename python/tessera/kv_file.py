# SPDX-License-Identifier: Apache-2.0
"""KV caches in a file, decoded by streaming their pages from storage (tessera/kv_file.h).

    tessera.save_kv_file(cache, "layer0.kv", b=0)          # one sequence of an in-RAM KVCache
    with tessera.KVFileWriter("layer0.kv", dtype="int4", num_kv_heads=8, head_dim=128,
                              capacity=1 << 20) as w:      # or token by token, one page in RAM
        w.append(k, v)                                     # k, v [1, n, Hkv, D]
    f = tessera.KVFile("layer0.kv")
    out = f.decode(q, causal=True)                         # q [1, Q, Hq, D]
"""
import os

from . import _C
from . import _arrays as A
from .decode import KV_DTYPES, KVCache, _int

READERS = ("auto", "io_uring", "threads")


class KVFile:
    """An open KV cache file (validated: a missing, truncated or corrupt file, or one of another
    format version, is a ValueError naming the path). One sequence of one layer."""

    def __init__(self, path):
        self._f = _C.KVFile(os.fspath(path))

    path = property(lambda self: self._f.path)
    dtype = property(lambda self: self._f.dtype)
    page_size = property(lambda self: self._f.page_size)
    num_kv_heads = property(lambda self: self._f.num_kv_heads)
    head_dim = property(lambda self: self._f.head_dim)
    num_pages = property(lambda self: self._f.num_pages)
    tokens = property(lambda self: self._f.tokens)
    file_bytes = property(lambda self: self._f.file_bytes)

    def decode(self, q, *, causal=False, softcap=0.0, alibi_slopes=None, scale=None,
               chunk_tokens=0, split_tokens=0, reader="auto", buffers=0, select_top_k=0,
               decode_threads=0, return_lse=False, return_stats=False, threads=None):
        """Attention of q [1, Q, Hq, D] (Q in 1..16) over every token of the file, streamed in
        chunks of chunk_tokens (0: about 4 MiB) with the next chunks' reads in flight. Query row i
        sits at position tokens - Q + i. select_top_k > 0 reads only the chunks block selection
        keeps (tessera.mask.select_blocks over the file's key means; approximate). Returns out (kind and dtype of q), then the LSE float32
        [1, Hq, Q] with return_lse and a dict of what the reads did with return_stats."""
        kind = A.kind_of("q", q)
        if len(q.shape) != 4:
            raise ValueError(f"q: expected [1, Q, Hq, D], got shape {list(q.shape)}")
        if reader not in READERS:
            raise ValueError(f"reader: expected one of {', '.join(READERS)}, got {reader!r}")
        _, Q, Hq, _ = q.shape
        out = A.empty(kind, q.shape, like=q)
        lse = A.empty(kind, (1, Hq, Q), dtype="f32") if return_lse else None
        stats = self._f.decode(A.detach(q), out, lse, None if scale is None else float(scale),
                               bool(causal), -1, float(softcap),
                               A.as_f32(kind, "alibi_slopes", A.detach(alibi_slopes)),
                               _int("chunk_tokens", chunk_tokens, 0),
                               _int("split_tokens", split_tokens, 0), reader,
                               _int("buffers", buffers, 0), _int("select_top_k", select_top_k, 0),
                               _int("decode_threads", decode_threads, 0), A.threads_arg(threads))
        result = (out,) + ((lse,) if return_lse else ()) + ((stats,) if return_stats else ())
        return result[0] if len(result) == 1 else result


class KVFileWriter:
    """Builds a KV file token by token with one page in RAM (int8 / int4 pages quantized as
    KVCache.append does; the normalizers calibrated by the first append). The file appears at
    `path` only after finish() (or the end of a with block without an exception)."""

    def __init__(self, path, *, dtype, num_kv_heads, head_dim, capacity, page_size=256):
        if dtype not in KV_DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(KV_DTYPES)}, got {dtype!r}")
        self._w = _C.KVFileWriter(os.fspath(path), dtype, _int("page_size", page_size, 1),
                                  _int("num_kv_heads", num_kv_heads, 1),
                                  _int("head_dim", head_dim, 1), _int("capacity", capacity, 1))

    @property
    def tokens(self):
        return self._w.tokens

    def append(self, k, v, *, rotary_dim=0, rotary_base=10000.0, rotary_interleaved=False,
               threads=None):
        """Appends k, v [1, n, Hkv, D] (f32 / bf16 / f16, any strides), RoPE applied to k at its
        absolute positions when rotary_dim > 0."""
        A.common_kind(k=k, v=v)
        self._w.append(A.detach(k), A.detach(v), _int("rotary_dim", rotary_dim, 0),
                       float(rotary_base), bool(rotary_interleaved), A.threads_arg(threads))

    def finish(self):
        self._w.finish()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finish()
        return False


def save_kv_file(cache, path, *, b=0, page_size=0):
    """Writes sequence b of a tessera.KVCache to a new KV file (rows and quantization scales
    copied bitwise), with page_size tokens per file page (0: the cache's, at most 256)."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a tessera.KVCache, got {type(cache).__name__}")
    _C.save_kv_file(cache._pool, cache._seq_lens, cache._block_table, _int("b", b, 0),
                    os.fspath(path), _int("page_size", page_size, 0))
