"""Children that die with their launcher (Linux PR_SET_PDEATHSIG).

Set in the child itself, after exec, never in a ``preexec_fn``: a
``preexec_fn`` runs between fork and exec, and in a launcher with threads
(gRPC channels, a client pool) a lock held by another thread at fork time
can hang the child there forever (seen: a test spawning a node hung in
``Popen._execute_child``). A launcher passes its pid in
``TENSORCACHE_PARENT_PID``; the child arms the signal and then checks that
its parent is still that process, which closes the race of a launcher that
died before the signal was armed.

The kernel ties PR_SET_PDEATHSIG to the *thread* that forked the child,
not to the process: a child started from a short-lived thread (a test's
fault-injection thread, a pool worker) is killed when that thread ends,
although its launcher lives on. So launchers start children through
``popen``, which runs every ``Popen`` on one daemon thread that lives as
long as the process.

An app module, not core: it is process plumbing for launchers (``cluster``,
the demo, the test harnesses) and for the children they start, which arm it
in ``tensorcache/__main__.py`` before anything else; no library component
(node, router, client) imports it, and a user's process must not get a death
signal armed by importing the cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

ENV = "TENSORCACHE_PARENT_PID"
_PR_SET_PDEATHSIG = 1

_libc = (
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if sys.platform.startswith("linux")
    else None
)


def arm() -> None:
    """Get SIGTERM when the parent process exits (no-op off Linux)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def from_env() -> None:
    """In a child started by a launcher that set ``ENV``: die with that launcher."""
    parent = os.environ.get(ENV, "")
    if not parent.isdigit():
        return
    arm()
    if os.getppid() != int(parent):  # the launcher was gone before we armed
        os.kill(os.getpid(), signal.SIGTERM)


_spawner = ThreadPoolExecutor(1, thread_name_prefix="tensorcache-spawner")


def popen(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` from the process-lifetime spawner thread (see above)."""

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, **kwargs)

    return _spawner.submit(spawn).result()
