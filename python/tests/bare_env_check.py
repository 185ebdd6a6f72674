# SPDX-License-Identifier: Apache-2.0
"""Run by `make test-python` in a venv that holds only numpy and the tessera wheel: the package
imports and computes without torch, and never imports it."""
import importlib.util
import sys

import numpy as np

assert importlib.util.find_spec("torch") is None, "this check expects a venv without torch"
import tessera  # noqa: E402

rng = np.random.default_rng(0)
q = rng.standard_normal((1, 8, 2, 16), dtype=np.float32)
out = tessera.attention(q, q, q, causal=True)
assert isinstance(out, np.ndarray) and out.shape == q.shape and np.isfinite(out).all()
assert "torch" not in sys.modules
print(f"tessera {tessera.__version__} works with numpy alone ({tessera.info()['simd_target']})")
