"""The ``tensorcache`` command: ``up`` runs a cluster, ``stat`` reads it, signals stop it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorcache.apps.etcdserver import find_etcd

from .helpers import poll, read_line

pytestmark = pytest.mark.integration

ROUTER_LINE = re.compile(r"^tensorcache cluster up: router (127\.0\.0\.1:\d+)$")
NODE_LINE = re.compile(r"^\s+(node-\d+)\s+(127\.0\.0\.1:\d+)\s+pid (\d+)$")


def tensorcache_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tensorcache", *args]


def children_of(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (from /proc/<pid>/stat)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.add(int(entry.name))
    return out


def describe(pids: set[int], log_dir: Path) -> str:
    """For a failure message: what the pids are, what state they are in, their logs."""
    out = []
    for pid in sorted(pids):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = Path(f"/proc/{pid}/wchan").read_text()
        except OSError:
            continue
        out.append(f"pid {pid} state {state} wchan {wchan}: {cmd}")
    for log in sorted(log_dir.glob("*.log")):
        out.append(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:]))
    return "\n".join(out)


def wait_gone(pids: set[int], log_dir: Path, timeout: float) -> None:
    try:
        poll(lambda: not any(running(p) for p in pids), timeout=timeout, what="children to exit")
    except BaseException:
        pytest.fail(
            f"children still running:\n{describe({p for p in pids if running(p)}, log_dir)}"
        )


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class Up:
    """A running ``tensorcache up`` and what it announced."""

    def __init__(self, proc: subprocess.Popen[bytes], log_dir: Path) -> None:
        self.proc = proc
        self.log_dir = log_dir
        m = ROUTER_LINE.match(read_line(proc, timeout=60).rstrip("\n"))
        assert m, "first line must announce the router"
        self.router = m.group(1)
        self.nodes: dict[str, tuple[str, int]] = {}
        for _ in range(3):
            line = read_line(proc).rstrip("\n")
            m = NODE_LINE.match(line)
            assert m, f"not a node line: {line!r}"
            self.nodes[m.group(1)] = (m.group(2), int(m.group(3)))
        assert read_line(proc).startswith("logs in ")
        self.membership = read_line(proc).rstrip("\n")
        assert self.membership.startswith("membership ")
        self.children = children_of(proc.pid)


@contextlib.contextmanager
def start_up(tmp_path: Path, etcd: str) -> Iterator[Up]:
    with open(tmp_path / "up.stderr", "wb") as err:
        proc = subprocess.Popen(
            tensorcache_cmd(
                "up", "--nodes", "3", "--port", "0", "--capacity", "64MiB",
                "--log-dir", str(tmp_path / "logs"), "--etcd", etcd,
            ),
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    children: set[int] = set()
    try:
        started = Up(proc, tmp_path / "logs")
        children = started.children
        yield started
    finally:
        if proc.poll() is None:  # a failed test: stop it the polite way, then hard
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        for pid in children:  # never leak processes, even from a failed test
            if running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def up(tmp_path) -> Iterator[Up]:
    """`up` with membership in the router (the etcd path has its own test)."""
    with start_up(tmp_path, "none") as started:
        yield started


@pytest.mark.skipif(
    find_etcd() is None and not os.environ.get("CI"), reason="no etcd binary installed"
)
def test_up_with_a_private_etcd(tmp_path):
    with start_up(tmp_path, "auto") as started:
        assert started.membership.startswith("membership etcd http://127.0.0.1:")
        assert len(started.children) == 5  # etcd, the router and three nodes
        res = subprocess.run(
            tensorcache_cmd("stat", "--router", started.router),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert all(name in res.stdout for name in ("node-0", "node-1", "node-2"))
        children = set(started.children)
        started.proc.send_signal(signal.SIGINT)
        assert started.proc.wait(60) == 0
        wait_gone(children, started.log_dir, timeout=30)


def test_up_then_stat(up):
    assert sorted(up.nodes) == ["node-0", "node-1", "node-2"]
    node_pids = {pid for _, pid in up.nodes.values()}
    assert node_pids <= up.children
    assert len(up.children) == 4  # the router and three nodes

    res = subprocess.run(
        tensorcache_cmd("stat", "--router", up.router), capture_output=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout.decode()
    assert f"router {up.router}" in out and "nodes 3" in out
    rows = [line for line in out.splitlines() if line.startswith("node-")]
    assert len(rows) == 3
    for name, (address, _) in up.nodes.items():
        assert any(row.split()[:2] == [name, address] for row in rows), (name, out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_stops_every_process_on_a_signal(up, sig):
    children = set(up.children)
    assert len(children) == 4
    up.proc.send_signal(sig)
    assert up.proc.wait(60) == 0
    assert read_line(up.proc).strip() == "tensorcache cluster stopped"
    wait_gone(children, up.log_dir, timeout=30)


def test_children_die_with_a_killed_up(up):
    # No goodbye from `up`: its children must still go (parent-death signal).
    children = set(up.children)
    up.proc.send_signal(signal.SIGKILL)
    up.proc.wait(30)
    wait_gone(children, up.log_dir, timeout=30)


def test_stat_against_no_router_fails_cleanly():
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = subprocess.run(
        tensorcache_cmd("stat", "--router", f"127.0.0.1:{port}", "--timeout", "1"),
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert res.stderr.decode().startswith("tensorcache stat:")
    assert "Traceback" not in res.stderr.decode()
