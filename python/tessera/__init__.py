# SPDX-License-Identifier: Apache-2.0
"""tessera: fast, memory-efficient attention on CPUs, from numpy and PyTorch.

    import tessera
    out = tessera.attention(q, k, v, causal=True)        # q [B, S, H, D], numpy or torch

Arrays are read in place (any strides); results come back as the kind of the inputs. torch is
never imported by tessera itself: its features turn on when the caller passes torch tensors.
Drop-in replacements for flash_attn, torch's scaled_dot_product_attention and fla live in
tessera.compat; sequence-parallel ring attention over torch.distributed or mpi4py in
tessera.distributed.
"""
from . import _C
from . import distributed
from . import mask
from .approx import approx_attention, approx_attention_backward
from ._attention import AttentionStats, attention, attention_backward, attention_stats
from .decode import KVCache, apply_rotary, decode, merge_states
from .kv_file import KVFile, KVFileWriter, save_kv_file
from .kv_policy import (CakeAllocator, KeepSet, cake_keep, cake_preference, compact_kv, h2o_keep,
                        pyramidkv_budgets, snapkv_keep, streaming_keep, tova_keep)
from .longconv import (H3Grads, SsmStream, h3, h3_backward, long_conv1d, long_conv1d_backward,
                       ssm_kernel, ssm_scan)
from .linear import (linear_attention, linear_attention_backward, linear_attention_recurrent,
                     linear_feature_dim)
from .mask import Mask
from .vision import channel_attention

__version__ = _C.__version__


def info():
    """What this machine and build offer: the SIMD target in use, the compiled and supported
    targets, and the hardware threads."""
    return {"version": __version__, "simd_target": _C.simd_target(),
            "compiled_targets": list(_C.compiled_simd_targets()),
            "supported_targets": list(_C.supported_simd_targets()),
            "hardware_threads": _C.hardware_threads()}


def set_simd_target(name):
    """Forces every later call in this process onto one compiled SIMD target ('avx2', ...);
    'auto' returns to the best one. Process-wide: call it while no other tessera call runs."""
    _C.set_simd_target(name)


__all__ = ["approx_attention", "approx_attention_backward", "attention", "attention_backward",
           "attention_stats", "AttentionStats", "KVCache", "decode", "merge_states", "KVFile",
           "KVFileWriter", "save_kv_file", "apply_rotary", "linear_attention",
           "linear_attention_recurrent", "linear_attention_backward", "linear_feature_dim",
           "long_conv1d", "long_conv1d_backward", "h3", "h3_backward", "H3Grads", "ssm_kernel",
           "ssm_scan", "SsmStream", "Mask", "mask",
           "distributed", "info", "set_simd_target",
           "__version__", "KeepSet", "streaming_keep", "h2o_keep", "tova_keep", "snapkv_keep",
           "cake_keep", "cake_preference", "pyramidkv_budgets", "CakeAllocator", "compact_kv",
           "channel_attention"]
