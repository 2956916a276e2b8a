"""Keys: 1..1024 UTF-8 bytes, checked by the client and again by the node."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

import tensorcache
from tensorcache.apps.cluster import LocalCluster
from tensorcache.proto import tensorcache_pb2 as pb

from .helpers import (
    assert_same,
    get_request,
    raw_delete,
    raw_get,
    raw_put,
    rpc_error,
    tensor_header,
    total,
)

pytestmark = pytest.mark.integration


def key_of_bytes(prefix: str, n: int) -> str:
    """A key of exactly ``n`` UTF-8 bytes made mostly of multibyte characters."""
    key = prefix
    for ch in "€😀é" * n:  # 3-, 4- and 2-byte characters
        if len((key + ch).encode()) > n:
            break
        key += ch
    key += "a" * (n - len(key.encode()))
    assert len(key.encode("utf-8")) == n
    return key


def test_longest_key_with_multibyte_characters(client, prefix):
    key = key_of_bytes(prefix, 1024)
    assert len(key) < 1024  # characters, not bytes, would have been wrong
    value = np.arange(12, dtype=np.int32).reshape(3, 4)
    client.put(key, value)
    assert_same(client.get(key), value)
    assert_same(client.get_many([key])[key], value)
    assert client.delete(key) is True
    assert client.get(key) is None


def test_longest_key_with_a_striped_value(cluster: LocalCluster, prefix):
    # Stripe keys are longer than the user key; the longest user key must still work.
    key = key_of_bytes(prefix, 1024)
    value = np.random.default_rng(7).standard_normal(40_000)  # 320 KB: 5 stripes
    with tensorcache.connect(cluster.router_address, stripe_size="64KiB") as c:
        shards_before = total(c.stats(), "shards")
        c.put(key, value)
        assert total(c.stats(), "shards") == shards_before + 5
        assert_same(c.get(key), value)
        assert c.delete(key) is True
        assert total(c.stats(), "shards") == shards_before


def test_keys_are_compared_as_exact_strings(client, prefix):
    keys = {
        prefix + "caf\u00e9": np.array([1]),  # precomposed
        prefix + "cafe\u0301": np.array([2]),  # e + combining accent: another key
        prefix + "nul\x00inside": np.array([3]),
        prefix + "Case": np.array([4]),
        prefix + "case": np.array([5]),
    }
    client.put_many(keys)
    got = client.get_many(list(keys))
    for key, value in keys.items():
        assert_same(got[key], value)


BAD_KEYS = {
    "1025-bytes": lambda p: key_of_bytes(p, 1025),
    "empty": lambda p: "",
    "bytes": lambda p: (p + "k").encode(),
    "int": lambda p: 5,
    "none": lambda p: None,
    "lone-surrogate": lambda p: p + "\ud800x",
}


@pytest.mark.parametrize("make_key", list(BAD_KEYS.values()), ids=list(BAD_KEYS))
def test_bad_keys_are_refused_by_every_call(client, prefix, make_key):
    key = make_key(prefix)
    value = np.arange(3)
    keys_before = total(client.stats(), "keys")
    calls = [
        lambda: client.put(key, value),
        lambda: client.get(key),
        lambda: client.delete(key),
        lambda: client.put_many({key: value, prefix + "ok": value}),
        lambda: client.get_many([prefix + "ok", key]),
    ]
    for call in calls:
        with pytest.raises(tensorcache.InvalidArgument) as info:
            call()
        assert isinstance(info.value, ValueError)
        assert "key" in str(info.value)
    assert client.get(prefix + "ok") is None  # the batch was refused as a whole
    assert total(client.stats(), "keys") == keys_before


def test_get_many_refuses_a_single_string(client):
    with pytest.raises(tensorcache.InvalidArgument, match="single str"):
        client.get_many("abc")


@pytest.fixture(scope="module")
def node_address(cluster: LocalCluster) -> str:
    return next(iter(cluster.nodes.values())).address


NOT_UTF8 = b"\xff\xfebad\xc3"


def test_node_refuses_non_utf8_key_on_put(node_address, client, prefix):
    payload = b"\x01\x02\x03"
    err = rpc_error(lambda: raw_put(node_address, [tensor_header(NOT_UTF8, payload), payload]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in err.details()


def test_node_refuses_non_utf8_key_on_get_and_delete(node_address):
    err = rpc_error(lambda: raw_get(node_address, get_request(NOT_UTF8)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in err.details()

    request = pb.DeleteRequest(keys=[pb.EntryKey(key=NOT_UTF8, kind=pb.TENSOR)])
    err = rpc_error(lambda: raw_delete(node_address, request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in err.details()


@pytest.mark.parametrize("raw_key", [b"", b"k" * 1025], ids=["empty", "1025-bytes"])
def test_node_refuses_empty_and_overlong_keys(node_address, raw_key):
    payload = b"\x00" * 8
    err = rpc_error(lambda: raw_put(node_address, [tensor_header(raw_key, payload), payload]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key" in err.details()
    err = rpc_error(lambda: raw_get(node_address, get_request(raw_key)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
