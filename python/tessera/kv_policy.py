# SPDX-License-Identifier: Apache-2.0
"""KV cache eviction (tessera/kv_policy.h): keep-sets from attention statistics, and compaction.

    keep = tessera.snapkv_keep(key_mass, cache.seq_lens, cache.num_kv_heads, budget=512)
    freed = tessera.compact_kv(cache, keep)       # in place; a paged cache gets its pages back

Statistics are float32 arrays [B, H, S] (H = Hkv, or Hq: the rows of a GQA group are combined),
TOVA's probabilities [B, Hq, Q, S]: AttentionStats / DecodeStats of the C++ API, or any scores
of that shape. The budget is in tokens per (sequence, KV head); sequences of at most `budget`
tokens keep everything. docs/kv_eviction.md describes each policy.
"""
import numpy as np

from . import _C
from . import _arrays as A
from .decode import KVCache, _int


class KeepSet:
    """The tokens each (sequence, KV head) keeps: tokens[b] is an int32 array [Hkv, count_b] of
    indices into the sequence, ascending along each row."""

    def __init__(self, tokens):
        self.tokens = [np.ascontiguousarray(t, dtype=np.int32) for t in tokens]

    @property
    def counts(self):
        return [int(t.shape[1]) for t in self.tokens]

    def _flat(self):
        counts = np.asarray(self.counts, dtype=np.int32)
        flat = (np.concatenate([t.reshape(-1) for t in self.tokens]) if self.tokens
                else np.zeros(0, dtype=np.int32))
        return counts, np.ascontiguousarray(flat, dtype=np.int32)


def _lens(seq_lens):
    lens = A.as_i32(A.NUMPY, "seq_lens", np.asarray(seq_lens))
    if lens.ndim != 1:
        raise ValueError(f"seq_lens: expected a [B] array, got shape {list(lens.shape)}")
    return lens


def _stats(name, x):
    return None if x is None else A.as_f32(A.NUMPY, name, np.asarray(x))


def _keep(policy, stats, stats_sq, rows, seq_lens, num_kv_heads, budget, window=0, kernel=1,
          pool="max", sinks=0, gamma=0.0):
    lens = _lens(seq_lens)
    hkv = _int("num_kv_heads", num_kv_heads, 1)
    budget = _int("budget", budget, 1)
    counts = np.minimum(np.maximum(lens.astype(np.int64), 0), budget)
    flat = np.zeros(int(counts.sum()) * hkv, dtype=np.int32)
    _C.policy_keep(policy, _stats("stats", stats), _stats("stats_sq", stats_sq), int(rows), lens,
                   hkv, budget, int(window), int(kernel), pool, int(sinks), float(gamma), flat)
    out, at = [], 0
    for c in counts:
        c = int(c)
        out.append(flat[at:at + hkv * c].reshape(hkv, c))
        at += hkv * c
    return KeepSet(out)


def streaming_keep(seq_lens, num_kv_heads, budget, *, sinks=4):
    """StreamingLLM: the first `sinks` tokens and the most recent rest."""
    return _keep("streaming", None, None, 0, seq_lens, num_kv_heads, budget,
                 sinks=_int("sinks", sinks, 0))


def h2o_keep(scores, seq_lens, num_kv_heads, budget, *, recent=32):
    """H2O: the `recent` most recent tokens and the top of the rest by accumulated attention
    `scores` [B, H, S], summed over the GQA group."""
    return _keep("h2o", scores, None, 0, seq_lens, num_kv_heads, budget,
                 window=_int("recent", recent, 0))


def tova_keep(probs, seq_lens, num_kv_heads, budget):
    """TOVA: the top by the current query's attention, probs [B, Hq, Q, S], summed over the
    group's heads and the Q rows."""
    return _keep("tova", probs, None, 0, seq_lens, num_kv_heads, budget)


def snapkv_keep(key_mass, seq_lens, num_kv_heads, budget, *, window=32, kernel=7, pool="max"):
    """SnapKV: the last `window` tokens and the top of the rest by the window's key_mass
    [B, H, S] summed over the GQA group, pooled ('max' or 'avg') over `kernel` keys."""
    return _keep("snapkv", key_mass, None, 0, seq_lens, num_kv_heads, budget,
                 window=_int("window", window, 0), kernel=_int("kernel", kernel, 1), pool=pool)


def cake_keep(key_mass, key_mass_sq, rows, seq_lens, num_kv_heads, budget, *, window=32,
              kernel=5, pool="avg", gamma=200.0):
    """CAKE within a layer: the last `window` tokens and the top of the rest by mean + gamma *
    variance of each key's attention across the `rows` window rows (key_mass, key_mass_sq
    [B, H, S]), averaged over the GQA group, pooled."""
    return _keep("cake", key_mass, key_mass_sq, _int("rows", rows, 1), seq_lens, num_kv_heads,
                 budget, window=_int("window", window, 0), kernel=_int("kernel", kernel, 1),
                 pool=pool, gamma=float(gamma))


def cake_preference(key_mass, key_mass_sq, rows, seq_lens, num_kv_heads, *, tau1=1.0,
                    tau2=1.0):
    """CAKE's layer preference: (P, H, V) with H the entropy of the window-averaged attention,
    V the summed variance of each key's attention across the rows, P = H^(1/tau1) V^(1/tau2)."""
    p, h, v = _C.cake_preference(_stats("key_mass", key_mass),
                                 _stats("key_mass_sq", key_mass_sq), _int("rows", rows, 1),
                                 _lens(seq_lens), _int("num_kv_heads", num_kv_heads, 1),
                                 float(tau1), float(tau2))
    return p, h, v


def pyramidkv_budgets(total, num_layers, beta=20.0):
    """PyramidKV's per-layer budgets: `total` tokens over `num_layers` layers, decreasing linearly
    from 2 total / L - total / (beta L) to total / (beta L); they sum to `total`."""
    return list(_C.pyramidkv_budgets(_int("total", total, 1), _int("num_layers", num_layers, 1),
                                     float(beta)))


class CakeAllocator:
    """CAKE's cascading budgets: add_layer(preference) as each layer's statistics arrive returns
    the budgets of the layers seen so far (`reserved` each, plus a share of the rest in
    proportion to the preferences; earlier layers only shrink)."""

    def __init__(self, num_layers, total, reserved=0):
        self.num_layers = _int("num_layers", num_layers, 1)
        self.total = _int("total", total, 1)
        self.reserved = _int("reserved", reserved, 0)
        _C.cake_budgets([], self.num_layers, self.total, self.reserved)  # validates
        self._preferences = []
        self.budgets = []

    def add_layer(self, preference):
        prefs = self._preferences + [float(preference)]
        self.budgets = list(_C.cake_budgets(prefs, self.num_layers, self.total,
                                            self.reserved)[-1])
        self._preferences = prefs
        return list(self.budgets)


def compact_kv(cache, keep, *, positions=None, reindex=False, rotary_dim=0, rotary_base=10000.0,
               rotary_interleaved=False, threads=None):
    """Applies `keep` to `cache` in place: kept token i of each (sequence, head) moves to index i,
    seq_lens become the counts, and a paged cache takes back the pages it no longer needs (their
    ids are returned). positions (int32 [B, Hkv, S], optional) is compacted along. reindex
    (f32 / bf16 / f16 caches) moves kept token i to position i, rotating its stored key by the
    difference (RoPE with rotary_dim / rotary_base / rotary_interleaved)."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a tessera.KVCache, got {type(cache).__name__}")
    if not isinstance(keep, KeepSet):
        raise TypeError(f"keep: expected a tessera.KeepSet, got {type(keep).__name__}")
    counts, flat = keep._flat()
    freed = list(_C.compact_kv(cache._pool, cache._seq_lens, cache._block_table, counts, flat,
                               positions, bool(reindex), _int("rotary_dim", rotary_dim, 0),
                               float(rotary_base), bool(rotary_interleaved),
                               A.threads_arg(threads)))
    if cache.paged:
        for b in range(cache.batch):
            cache._pages_held[b] = -(-int(cache._seq_lens[b]) // cache.page_size)
            cache._block_table[b, cache._pages_held[b]:] = 0
        cache._free_pages.extend(freed)
    return freed
