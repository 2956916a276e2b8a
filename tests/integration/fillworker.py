"""Processes for test_fill.py (a module of its own: spawned children import it cheaply)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

import tensorcache

VALUE = np.arange(3 * 1024 * 1024, dtype=np.float32)  # 12 MiB: striped


def counting_loader(log: str, delay_s: float):  # type: ignore[no-untyped-def]
    def load() -> np.ndarray:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(delay_s)  # the load itself (object storage), not synchronization
        return VALUE

    return load


def gated_loader(log: str, started: str, go: str, timeout_s: float = 120.0):  # type: ignore[no-untyped-def]
    """A loader that logs its pid, says it started, and returns VALUE once ``go`` exists."""

    def load() -> np.ndarray:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        Path(started).touch()
        wait_for(go, timeout_s)
        return VALUE

    return load


def wait_for(path: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


def load_once(
    router: str, key: str, log: str, delay_s: float, lease_s: float = 2.0, go: str | None = None
) -> bool:
    """get_or_load in a fresh process; True if the result is exactly VALUE.

    With ``go``: connect, say so (``go``.ready.<pid>), and start once ``go`` exists.
    """
    with tensorcache.connect(router) as c:
        if go is not None:
            Path(f"{go}.ready.{os.getpid()}").touch()
            wait_for(go)
        got = c.get_or_load(key, counting_loader(log, delay_s), lease_s=lease_s, timeout_s=60)
    return bool(np.array_equal(got, VALUE))


def load_gated(
    router: str, key: str, log: str, started: str, go: str, lease_s: float = 2.0
) -> bool:
    """get_or_load with ``gated_loader`` in a fresh process; True if it got VALUE."""
    with tensorcache.connect(router) as c:
        got = c.get_or_load(key, gated_loader(log, started, go), lease_s=lease_s, timeout_s=120)
    return bool(np.array_equal(got, VALUE))


def die_while_filling(router: str, key: str, started: str, lease_s: float) -> None:
    """Take the fill grant, renew it for over a lease period, announce it, hang until killed."""
    with tensorcache.connect(router) as c:

        def load() -> np.ndarray:
            deadline = time.monotonic() + 60
            while c.metrics().get("fill_renewals", 0) < 5:  # held > 1 period by renewing
                if time.monotonic() > deadline:
                    raise TimeoutError("the fill lease was never renewed")
                time.sleep(0.02)
            Path(started).write_text(str(os.getpid()))
            time.sleep(600)  # the test kills this process
            return VALUE

        c.get_or_load(key, load, lease_s=lease_s)
