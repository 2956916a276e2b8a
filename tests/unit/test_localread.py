"""process_vm_readv helpers, read against this very process."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tensorcache import localread

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not localread.AVAILABLE, reason="needs Linux process_vm_readv"),
]


def test_reads_chunks_in_order_into_dest():
    parts = [(np.arange(n) % 7 + n % 200).astype(np.uint8) for n in (1000, 3, 70_000)]
    chunks = [(localread.address_of(p), p.nbytes) for p in parts]
    dest = np.zeros(sum(p.nbytes for p in parts), np.uint8)
    assert localread.read_remote(os.getpid(), chunks, dest)
    assert np.array_equal(dest, np.concatenate(parts))


def test_size_mismatch_and_bad_address_fail_without_raising():
    src = np.ones(16, np.uint8)
    assert not localread.read_remote(
        os.getpid(), [(localread.address_of(src), 16)], np.zeros(8, np.uint8)
    )
    assert not localread.read_remote(os.getpid(), [(8, 16)], np.zeros(16, np.uint8))  # unmapped


def test_probe_checks_the_token():
    token = os.urandom(16)
    addr = localread.address_of(token)
    assert localread.probe(os.getpid(), addr, token)
    assert not localread.probe(os.getpid(), addr, os.urandom(16))
    assert not localread.probe(0, addr, token)
    assert not localread.probe(os.getpid(), addr, b"")
