# SPDX-License-Identifier: Apache-2.0
"""tessera's eviction policies and compact_kv against numpy: keep-sets from direct numpy
re-implementations (ties to the more recent token), the budgets' sums, and a compacted cache
read back and decoded like a cache built from the kept rows (include/tessera/kv_policy.h)."""
import numpy as np
import pytest

import tessera


def direct(len_, budget, front, back, score):
    count = min(budget, len_)
    if count == len_:
        return list(range(len_))
    front = min(front, count)
    back = min(back, count - front)
    k = count - front - back
    cand = sorted(range(front, len_ - back), key=lambda j: (-score[j], -j)) if k > 0 else []
    return sorted(list(range(front)) + cand[:k] +
                  list(range(len_ - back, len_)))


def test_policies_match_numpy():
    rng = np.random.default_rng(0)
    lens = np.array([0, 7, 30], dtype=np.int32)
    hkv, g, S = 2, 2, 32
    mass = (rng.integers(0, 4, size=(3, hkv * g, S)) * 0.25).astype(np.float32)  # ties
    for budget in (1, 5, 12, 40):
        h2o = tessera.h2o_keep(mass, lens, hkv, budget, recent=3)
        snap = tessera.snapkv_keep(mass, lens, hkv, budget, window=4, kernel=3, pool="avg")
        stream = tessera.streaming_keep(lens, hkv, budget, sinks=2)
        for b, n in enumerate(lens):
            for h in range(hkv):
                group = mass[b, h * g:(h + 1) * g, :n].astype(np.float64).sum(0)
                assert list(h2o.tokens[b][h]) == direct(n, budget, 0, 3, group)
                back = min(4, budget, n)
                cand = n - back
                pooled = [group[max(0, j - 1):min(cand, j + 2)].mean() for j in range(cand)]
                assert list(snap.tokens[b][h]) == direct(n, budget, 0, 4, pooled)
                assert list(stream.tokens[b][h]) == direct(n, budget, 2, budget, [])


def test_budgets():
    budgets = tessera.pyramidkv_budgets(600, 6)
    assert sum(budgets) == 600 and budgets == sorted(budgets, reverse=True)
    alloc = tessera.CakeAllocator(3, 90, reserved=10)
    previous = None
    for pref in (1.0, 2.0, 0.5):
        b = alloc.add_layer(pref)
        assert all(x >= 10 for x in b)
        if previous:
            assert all(x <= y for x, y in zip(b, previous))
        previous = b
    assert sum(previous) == 90
    with pytest.raises(ValueError, match="reserved"):
        tessera.CakeAllocator(3, 90, reserved=31)


@pytest.mark.parametrize("dtype,page_size", [("f32", None), ("f16", 5), ("int4", 3)])
def test_compact_kv(dtype, page_size):
    rng = np.random.default_rng(1)
    B, n, hkv, D = 2, 13, 2, 8
    cache = tessera.KVCache(batch=B, num_kv_heads=hkv, head_dim=D, max_tokens=16, dtype=dtype,
                            page_size=page_size)
    cache.append(rng.standard_normal((B, n, hkv, D), dtype=np.float32),
                 rng.standard_normal((B, n, hkv, D), dtype=np.float32))
    before = [cache.read(b) for b in range(B)]
    scores = rng.standard_normal((B, hkv, n)).astype(np.float32)
    keep = tessera.h2o_keep(scores, cache.seq_lens, hkv, 6, recent=2)
    freed = tessera.compact_kv(cache, keep)
    assert list(cache.seq_lens) == [6, 6]
    if page_size:
        assert len(freed) == B * (-(-n // page_size) - -(-6 // page_size))
    for b in range(B):
        k, v = cache.read(b)
        for h in range(hkv):
            np.testing.assert_array_equal(k[:, h], before[b][0][keep.tokens[b][h], h])
            np.testing.assert_array_equal(v[:, h], before[b][1][keep.tokens[b][h], h])
    # The cache keeps working: append after compaction, then decode.
    cache.append(rng.standard_normal((B, 1, hkv, D), dtype=np.float32),
                 rng.standard_normal((B, 1, hkv, D), dtype=np.float32))
    out = tessera.decode(rng.standard_normal((B, 1, 4, D), dtype=np.float32), cache)
    assert np.isfinite(out).all() and list(cache.seq_lens) == [7, 7]


def test_bad_input():
    with pytest.raises(ValueError, match="budget"):
        tessera.streaming_keep([4], 1, 0)
    cache = tessera.KVCache(batch=1, num_kv_heads=1, head_dim=4, max_tokens=8, dtype="int8")
    cache.append(np.ones((1, 5, 1, 4), np.float32), np.ones((1, 5, 1, 4), np.float32))
    keep = tessera.streaming_keep(cache.seq_lens, 1, 3)
    with pytest.raises(ValueError, match="int8"):
        tessera.compact_kv(cache, keep, reindex=True, rotary_dim=2)
    assert list(cache.seq_lens) == [5]
