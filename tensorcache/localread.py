"""Co-located fast path: copy a node's stored bytes with ``process_vm_readv``.

A worker on the same host as a node does not need the network, nor shared
memory files: Linux copies straight from the node's address space into the
worker's result array in one kernel copy (measured here ~9-10 GB/s, against
~2.5 GB/s for a tmpfs file, whose 4 KiB pages dominate the cost; the node's
anonymous memory uses transparent huge pages).

Safety, and why bytes never change under a reader:
- a node never writes a stored buffer after the put that filled it;
- the node answers a local GET with the addresses of the entries' buffers
  and keeps those buffers referenced (pinned) until the next request on that
  data connection, so eviction or replacement cannot free them meanwhile;
- the client reads them while it still holds the connection, then releases
  it. A short read (EFAULT, ESRCH, EPERM) falls back to the network.

Co-location is proven, not guessed: the node advertises its pid and the
address of a random token in its memory; a client that reads the same token
there is on the same host, in the same pid namespace, and allowed to read.
Permission follows ptrace rules (same user; under Yama ptrace_scope=1 the
node opts in with PR_SET_PTRACER, see ``allow_local_readers``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Sequence

import numpy as np

_IOV_MAX = 1024
_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = (
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if sys.platform.startswith("linux")
    else None
)
_readv = getattr(_libc, "process_vm_readv", None)
if _readv is not None:
    _readv.restype = ctypes.c_ssize_t
    _readv.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_Iovec),
        ctypes.c_ulong,
        ctypes.POINTER(_Iovec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]

AVAILABLE = _readv is not None


def address_of(buffer: object) -> int:
    """The address of a contiguous buffer's first byte (bytes, bytearray, ndarray)."""
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)  # type: ignore[call-overload]  # any buffer


def allow_local_readers() -> None:
    """Let same-user processes read this process (needed under Yama scope 1; no-op elsewhere)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PTRACER, ctypes.c_ulong(_PR_SET_PTRACER_ANY), 0, 0, 0)


def read_remote(pid: int, chunks: Sequence[tuple[int, int]], dest: np.ndarray) -> bool:
    """Copy ``chunks`` ((addr, nbytes) in ``pid``) in order into flat uint8 ``dest``.

    True when every byte arrived; False on any failure (the caller falls back).
    """
    if _readv is None or sum(n for _, n in chunks) != dest.nbytes:
        return False
    base = dest.ctypes.data
    off = 0
    for start in range(0, len(chunks), _IOV_MAX):
        group = chunks[start : start + _IOV_MAX]
        remote = (_Iovec * len(group))(*[_Iovec(a, n) for a, n in group])
        want = sum(n for _, n in group)
        local = _Iovec(base + off, want)
        got = _readv(pid, ctypes.byref(local), 1, remote, len(group), 0)
        if got != want:
            return False
        off += want
    return True


def probe(pid: int, token_addr: int, token: bytes) -> bool:
    """Whether ``token`` lies at ``token_addr`` in process ``pid`` (co-located, permitted)."""
    if not token or pid <= 0:
        return False
    buf = np.zeros(len(token), dtype=np.uint8)
    return read_remote(pid, [(token_addr, len(token))], buf) and buf.tobytes() == token
