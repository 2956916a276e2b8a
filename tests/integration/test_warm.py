"""`tensorcache hot` then `tensorcache warm`: a new cluster gets the old one's hot set."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import tensorcache

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensorcache", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_export_the_hot_keys_and_warm_another_cluster(make_cluster, tmp_path):
    old = make_cluster(1, capacity="64MiB")  # one node: one recency order (merging: unit tests)
    new = make_cluster(1, capacity="64MiB")
    values = {f"m/w{i}": np.random.default_rng(i).standard_normal(4096) for i in range(20)}
    with tensorcache.connect(old.router_address) as c:
        c.put_many(values)
        for i in (4, 9, 13):
            c.get(f"m/w{i}")
        c.put("m/big", np.zeros(3 * 1024 * 1024, np.float32))  # striped
    out = tmp_path / "hot.jsonl"
    res = cli("hot", "--router", old.router_address, "--top", "5", "--out", str(out))
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 5
    assert [x["key"] for x in lines] == ["m/big", "m/w13", "m/w9", "m/w4", "m/w19"]
    assert next(x["nbytes"] for x in lines if x["key"] == "m/big") == 12 * 1024 * 1024

    res = cli(
        "warm", "--router", new.router_address, "--keys", str(out),
        "--from-cluster", old.router_address,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "warmed 5 keys" in res.stdout
    with tensorcache.connect(new.router_address) as c:
        got = c.get_many([x["key"] for x in lines])
        for key, value in got.items():
            want = values.get(key, np.zeros(3 * 1024 * 1024, np.float32))
            assert value is not None and value.tobytes() == want.tobytes(), key
        assert sum(s.keys for s in c.stats()) == 5  # only the hot set, nothing else

    out.write_text("{broken\n")
    res = cli("warm", "--router", new.router_address, "--keys", str(out),
              "--from-cluster", old.router_address)  # fmt: skip
    assert res.returncode == 2 and "hot.jsonl:1" in res.stderr
