# SPDX-License-Identifier: Apache-2.0
"""Array kinds: numpy arrays and torch CPU tensors, read in place and allocated alike.

tessera never imports torch itself: torch is used only when the caller hands in torch tensors
(then it is already imported), so `import tessera` works in an environment with numpy alone.
"""
import sys

import numpy as np


NUMPY = "numpy"
TORCH = "torch"

_torch = None


def torch_module():
    """The torch module when the caller has imported it, else None (never imports it)."""
    global _torch
    if _torch is None:
        _torch = sys.modules.get("torch")
    return _torch


def is_torch(x):
    torch = torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def kind_of(name, x):
    """NUMPY or TORCH for an array argument; TypeError for anything else."""
    if isinstance(x, np.ndarray):
        return NUMPY
    if is_torch(x):
        return TORCH
    raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(x).__name__}")


def common_kind(**arrays):
    """The one kind shared by every non-None argument (TypeError when they mix kinds)."""
    kind = None
    first = None
    for name, x in arrays.items():
        if x is None:
            continue
        k = kind_of(name, x)
        if kind is None:
            kind, first = k, name
        elif k != kind:
            raise TypeError(f"{name}: expected a {kind} array like {first}, got a {k} one")
    if kind is None:
        raise TypeError("expected at least one numpy array or torch tensor")
    return kind


def dtype_name(x):
    """'f32', 'bf16', 'f16', ... of an array of either kind."""
    if isinstance(x, np.ndarray):
        return {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16",
                np.dtype(np.float64): "f64", np.dtype(np.bool_): "bool",
                np.dtype(np.uint8): "u8", np.dtype(np.int32): "i32"}.get(x.dtype, str(x.dtype))
    torch = torch_module()
    return {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16",
            torch.float64: "f64", torch.bool: "bool", torch.uint8: "u8",
            torch.int32: "i32"}.get(x.dtype, str(x.dtype))


def empty(kind, shape, like=None, dtype=None):
    """An uninitialized array of `kind`: the dtype of `like` unless `dtype` ('f32') is given."""
    shape = tuple(int(s) for s in shape)
    if kind == NUMPY:
        return np.empty(shape, dtype=np.float32 if dtype == "f32" else like.dtype)
    torch = torch_module()
    return torch.empty(shape, dtype=torch.float32 if dtype == "f32" else like.dtype)


def empty_like(kind, x, shape):
    """An uninitialized array like x (dtype, and memory order where x is dense: an output for a
    transposed [B, H, S, D] view comes back in the same order) of `shape` (x's unless the last
    dim differs)."""
    if tuple(shape) != tuple(x.shape):
        return empty(kind, shape, like=x)
    if kind == NUMPY:
        return np.empty_like(x)
    return torch_module().empty_like(x)


def as_i32(kind, name, x):
    """An int32 array with unit stride of `kind` for an index argument (a list, or an array of
    any integer dtype), copied only when it is not one already."""
    if x is None:
        return None
    if kind == TORCH and not is_torch(x):
        torch = torch_module()
        x = torch.as_tensor(np.asarray(x), dtype=torch.int32)
    if is_torch(x):
        torch = torch_module()
        if x.is_floating_point():
            raise ValueError(f"{name}: expected integers, got dtype {x.dtype}")
        if x.dtype != torch.int32 or not x.is_contiguous():
            x = x.to(torch.int32).contiguous()
        return x
    a = np.asarray(x)
    if a.dtype.kind not in "iub":
        raise ValueError(f"{name}: expected integers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int32)


def as_f32(kind, name, x):
    """A float32 array of `kind` (a list or array of any float dtype), copied when needed."""
    if x is None:
        return None
    if is_torch(x):
        torch = torch_module()
        return x if x.dtype == torch.float32 else x.to(torch.float32)
    if kind == TORCH:
        torch = torch_module()
        return torch.as_tensor(np.asarray(x, dtype=np.float32))
    a = np.asarray(x)
    return a if a.dtype == np.float32 else a.astype(np.float32)


def detach(x):
    """Torch tensors without their autograd history (tessera reads the memory only)."""
    return x.detach() if is_torch(x) and x.requires_grad else x


def threads_arg(threads):
    if threads is None:
        return 0
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, (int, np.integer)):
        raise TypeError(f"threads: expected an int or None, got {type(threads).__name__}")
    threads = int(threads)
    if threads < 0:
        raise ValueError(f"threads: expected >= 0 (0 or None: every hardware thread), got "
                         f"{threads}")
    return threads
