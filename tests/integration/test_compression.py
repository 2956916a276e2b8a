"""Compressed tensors through real nodes, over every bulk path.

The node stores what the client sent (the compressed bytes, as a uint8
entry) and charges that to its budget; any client reads the tensor back
exactly, also into an ``out=`` array and when it is striped.
"""

from __future__ import annotations

import numpy as np
import pytest

import tensorcache
from tensorcache.client import compress

from .helpers import settled, total

pytest.importorskip("blosc2")
pytestmark = pytest.mark.integration


def activations(seed: int, n: int) -> np.ndarray:
    """ReLU outputs: half zeros, the rest positive floats."""
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return np.maximum(x, 0)


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_compressed_puts_read_back_exactly_over_every_path(cluster, transport, prefix, codec):
    small = activations(1, 64 * 1024)  # 256 KiB: one entry
    big = activations(2, 6 * 1024 * 1024)  # 24 MiB: striped even compressed (8 MiB stripes)
    with tensorcache.connect(cluster.router_address, **transport) as c:
        before = total(settled(c), "bytes_used")
        c.put(prefix + "small", small, compression=codec)
        c.put_many({prefix + "big": big}, compression=codec)
        used = total(settled(c), "bytes_used") - before
        packed = sum(compress.pack(v, codec)[0].nbytes for v in (small, big))
        assert packed < small.nbytes + big.nbytes
        # The compressed size is what is charged (plus keys, metadata and
        # the per-entry overhead of 2 entries and 3 stripes).
        assert packed <= used < packed + 16 * 1024
        with tensorcache.connect(cluster.router_address, **transport) as reader:
            assert reader.get(prefix + "small").tobytes() == small.tobytes()
            out = np.empty_like(big)
            assert reader.get(prefix + "big", out=out) is out
            assert out.tobytes() == big.tobytes()


def test_namespace_default_set_at_connect(cluster, prefix):
    value = activations(3, 256 * 1024)
    with tensorcache.connect(cluster.router_address, compression={prefix: "zstd"}) as c:
        before = total(settled(c), "bytes_used")
        c.put(prefix + "a", value)
        assert total(settled(c), "bytes_used") - before < 0.8 * value.nbytes
        assert np.array_equal(c.get(prefix + "a"), value)
