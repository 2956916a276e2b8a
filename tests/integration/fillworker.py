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
        time.sleep(delay_s)
        return VALUE

    return load


def load_once(router: str, key: str, log: str, delay_s: float) -> bool:
    """get_or_load in a fresh process; True if the result is exactly VALUE."""
    with tensorcache.connect(router) as c:
        got = c.get_or_load(key, counting_loader(log, delay_s), timeout_s=60)
    return bool(np.array_equal(got, VALUE))


def die_while_filling(router: str, key: str, started: str) -> None:
    """Take the fill grant (short ttl), announce it, then hang until killed."""

    def load() -> np.ndarray:
        Path(started).write_text("filling")
        time.sleep(600)
        return VALUE

    with tensorcache.connect(router) as c:
        c.get_or_load(key, load, fill_ttl_s=2.0)
