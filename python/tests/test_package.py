# SPDX-License-Identifier: Apache-2.0
"""The package itself: torch stays unimported, the version matches CMake's, tessera.info()."""
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import tessera
from conftest import assert_close, qkv, ref_attention, tol

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_python(code):
    env = dict(os.environ)
    # the tessera this test imported (the installed wheel, or a source tree on PYTHONPATH)
    env["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(tessera.__file__).parents[1])] +
                                        sys.path)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_does_not_import_torch():
    out = run_python(
        "import sys\n"
        "import numpy as np\n"
        "import tessera\n"
        "print('after import', 'torch' in sys.modules)\n"
        "q = np.ones((1, 3, 2, 8), np.float32)\n"
        "tessera.attention(q, q, q, causal=True, attn_mask=np.ones(3, bool))\n"
        "tessera.attention(q, q, q, mask=tessera.mask.prefix(1))\n"
        "c = tessera.KVCache(1, 2, 8, 4, dtype='int8')\n"
        "c.append(q[:, :2], q[:, :2])\n"
        "tessera.decode(q[:, :1], c)\n"
        "tessera.apply_rotary(q)\n"
        "print('after calls', 'torch' in sys.modules)\n"
        "print('file', tessera.__file__)\n")
    assert "after import False" in out
    assert "after calls False" in out
    # the subprocess tested the same package as this process
    assert str(pathlib.Path(tessera.__file__).parent) in out


def test_version_matches_cmake_project():
    text = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(r"project\(\s*tessera\s+VERSION\s+([0-9][0-9.]*)", text)
    assert m, "no project(tessera VERSION ...) in CMakeLists.txt"
    assert tessera.__version__ == m.group(1)
    assert tessera._C.__version__ == m.group(1)


def test_info():
    info = tessera.info()
    assert set(info) == {"version", "simd_target", "compiled_targets", "supported_targets",
                         "hardware_threads"}
    assert info["version"] == tessera.__version__
    assert isinstance(info["simd_target"], str) and info["simd_target"]
    assert info["simd_target"] in info["supported_targets"]
    assert set(info["supported_targets"]) <= set(info["compiled_targets"])
    assert isinstance(info["hardware_threads"], int) and info["hardware_threads"] >= 1


def test_public_names():
    for name in tessera.__all__:
        assert hasattr(tessera, name), name
    assert callable(tessera.attention) and callable(tessera.mask.neighborhood)


def test_every_supported_simd_target_matches_the_reference():
    info = tessera.info()
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, 1, 9, 21, 4, 2, 40)
    ref_out, _ = ref_attention(q, k, v, causal=True)
    try:
        tessera.set_simd_target(info["simd_target"])  # the name info() reports is accepted
        for target in info["supported_targets"]:
            tessera.set_simd_target(target)
            assert_close(tessera.attention(q, k, v, causal=True), ref_out, *tol("f32"),
                         name=f"out on {target}")
    finally:
        tessera.set_simd_target("auto")
    assert tessera.info()["simd_target"] == info["simd_target"]
    with pytest.raises(ValueError, match="target"):
        tessera.set_simd_target("no-such-target")
