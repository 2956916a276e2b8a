"""A SIGTERM stops a node or the router, whichever of its threads the kernel hands it to.

A process-directed signal may be delivered to any thread that does not block
it. CPython runs the Python-level handler later, on the main thread, the next
time that thread executes bytecode. ``tgkill`` makes the "another thread took
it" case happen every time instead of now and then (it is how ``tensorcache
up`` sometimes leaves an orphan router or node behind after a SIGKILL: the
parent-death SIGTERM lands on a gRPC thread).
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(platform.machine())


def tgkill(pid: int, tid: int, sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL, pid, tid, sig) != 0:
        err = ctypes.get_errno()
        if err != 3:  # ESRCH: the thread ended meanwhile
            raise OSError(err, os.strerror(err))


def other_threads(pid: int) -> list[int]:
    return sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir() if int(t.name) != pid)


@pytest.mark.skipif(SYS_TGKILL is None, reason="tgkill number unknown on this machine")
@pytest.mark.parametrize("role", ["node", "router"])
def test_sigterm_handled_on_any_thread_stops_the_process(make_cluster, role):
    cl = make_cluster(1)
    proc = cl.router if role == "router" else cl.nodes["node-0"]
    assert proc is not None
    threads = other_threads(proc.pid)
    assert threads, "a gRPC process has worker threads"
    for tid in threads:
        tgkill(proc.pid, tid, signal.SIGTERM)
    try:
        code = proc.popen.wait(timeout=10)  # a deadline for "it stops", not a speed test
    except subprocess.TimeoutExpired:
        code = None
        proc.popen.send_signal(signal.SIGTERM)  # process-directed: wakes the main thread
        proc.popen.wait(timeout=30)
    assert code == 0, f"{role} still running 10s after SIGTERM"


def test_a_node_started_from_a_short_lived_thread_outlives_it(make_cluster):
    """PR_SET_PDEATHSIG fires when the *thread* that forked the child exits; the
    launcher forks from one process-lifetime thread so this cannot kill children."""
    import threading

    import tensorcache

    cluster = make_cluster(1)
    t = threading.Thread(target=cluster.add_node, args=("late",))
    t.start()
    t.join()
    cluster.wait_members({"node-0", "late"}, timeout=30)
    with tensorcache.connect(cluster.router_address) as c:
        stats = {s.name: s for s in c.stats()}
    assert stats["late"].reachable
    assert cluster.nodes["late"].alive()
