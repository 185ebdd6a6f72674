# SPDX-License-Identifier: Apache-2.0
"""Communicators for the C++ sequence-parallel drivers (tessera/distributed.h), in Python.

The drivers call four methods, with the library's buffers as uint8 numpy arrays (no copies):
rank(), size(), start_exchange(send, dst, recv, src) -> handle, wait(handle), and
all_gather(send, recv) (recv holds size() * len(send) bytes, in rank order). Exchanges are
asynchronous and complete in the order they were started; every rank starts them in the same
order. Two implementations: a torch.distributed process group (gloo on CPU) and an mpi4py
communicator. Neither torch nor mpi4py is imported unless the caller's group is one of theirs.
"""
import sys


class TorchGroupComm:
    """A torch.distributed process group (None: the default group)."""

    def __init__(self, torch, group=None):
        dist = torch.distributed
        self._torch, self._dist, self._group = torch, dist, group
        self._rank = dist.get_rank(group)
        self._size = dist.get_world_size(group)
        if self._rank < 0:
            raise ValueError("group: expected a process group this process belongs to")

    def rank(self):
        return self._rank

    def size(self):
        return self._size

    def _global(self, r):
        if self._group is None or self._group is self._dist.group.WORLD:
            return r
        return self._dist.get_global_rank(self._group, r)

    def start_exchange(self, send, dst, recv, src):
        t = self._torch
        requests = []
        # Both sides know every size: a 0-byte message is simply not sent.
        if recv.size:
            requests.append(self._dist.irecv(t.from_numpy(recv), src=self._global(src),
                                             group=self._group))
        if send.size:
            requests.append(self._dist.isend(t.from_numpy(send), dst=self._global(dst),
                                             group=self._group))
        return requests

    def wait(self, requests):
        for r in requests:
            r.wait()

    def all_gather(self, send, recv):
        t = self._torch
        parts = list(t.from_numpy(recv).view(self._size, send.size).unbind(0))
        self._dist.all_gather(parts, t.from_numpy(send).clone(), group=self._group)


class MpiComm:
    """An mpi4py communicator, duplicated so that the drivers' messages never match the
    caller's (call close() when done)."""

    _TAG = 7418

    def __init__(self, comm):
        from mpi4py import MPI
        self._mpi = MPI
        self._comm = comm.Dup()

    def close(self):
        if self._comm is not None:
            self._comm.Free()
            self._comm = None

    def rank(self):
        return self._comm.Get_rank()

    def size(self):
        return self._comm.Get_size()

    def start_exchange(self, send, dst, recv, src):
        byte = self._mpi.BYTE
        return [self._comm.Irecv([recv, byte], source=src, tag=self._TAG),
                self._comm.Isend([send, byte], dest=dst, tag=self._TAG)]

    def wait(self, requests):
        self._mpi.Request.Waitall(requests)

    def all_gather(self, send, recv):
        byte = self._mpi.BYTE
        self._comm.Allgather([send, byte], [recv, byte])


def make_communicator(group):
    """The communicator for `group`: None (torch.distributed's default group), a
    torch.distributed ProcessGroup or an mpi4py communicator, told apart by type."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and isinstance(group, mpi.Comm):
        return MpiComm(group)
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    usable = dist is not None and dist.is_available()
    if group is None:
        if not usable or not dist.is_initialized():
            raise ValueError("group: expected a torch.distributed process group or an mpi4py "
                             "communicator, got None while torch.distributed is not initialized")
        return TorchGroupComm(torch, None)
    if usable and isinstance(group, dist.ProcessGroup):
        return TorchGroupComm(torch, group)
    raise TypeError(f"group: expected None, a torch.distributed ProcessGroup or an mpi4py "
                    f"communicator, got {type(group).__name__}")


class communicator:
    """Context manager: the communicator object for `group` (None or a torch.distributed group,
    or an mpi4py communicator)."""

    def __init__(self, group):
        self._group = group
        self._comm = None

    def __enter__(self):
        self._comm = make_communicator(self._group)
        return self._comm

    def __exit__(self, *exc):
        if isinstance(self._comm, MpiComm):
            self._comm.close()
        return False
