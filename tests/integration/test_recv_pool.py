"""Reused receive buffers (node/recvpool.py) never show one put's bytes in another.

Each node keeps the buffers of deleted and replaced stripes and receives the
next puts into them. Whatever still refers to an old buffer (a stored entry,
a co-located reader's pin) must keep it out of reuse; these rounds overwrite,
delete and re-put striped tensors over both bulk paths and read every one back.
"""

from __future__ import annotations

import numpy as np
import pytest

import tensorcache

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


@pytest.mark.parametrize("local", [False, True], ids=["network", "co-located"])
def test_reused_buffers_keep_every_value_intact(make_cluster, local):  # type: ignore[no-untyped-def]
    cluster = make_cluster(
        2, capacity="64MiB", stripe_size="1MiB", node_args=["--recv-pool", "16MiB"]
    )
    with tensorcache.connect(cluster.router_address, local_fastpath=local) as c:
        kept = {f"keep/{i}": np.full(3 * MIB, i, dtype=np.uint8) for i in range(2)}
        c.put_many(kept)
        for r in range(12):
            value = np.full(4 * MIB + 123, r, dtype=np.uint8)  # 5 stripes, the last short
            value[::4099] = 255 - r
            c.put("churn", value)  # replaces (and frees) the last round's stripes
            got = c.get("churn")
            assert got is not None and np.array_equal(got, value)
            if r % 3 == 2:
                c.delete("churn")
                assert c.get("churn") is None
        for key, value in kept.items():
            got = c.get(key)
            assert got is not None and np.array_equal(got, value), key
