"""KV-cache keys: the layout's identity and the chained chunk digests.

The golden vectors pin the derivation (docs/kv-cache.md): a change to them
silently splits every cluster into old and new keys, so it must be a
deliberate scheme bump, never an accident. The subprocess test proves the
keys do not depend on the process (PYTHONHASHSEED, i.e. no ``hash()``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tensorcache.errors import InvalidArgument
from tensorcache.kv import KVLayout, chunk_keys
from tensorcache.kv.chain import chunk_digests, root_digest, token_array

pytestmark = pytest.mark.unit

LAYOUT = KVLayout(
    "org/tiny-llama",
    "0123abcd",
    num_layers=2,
    num_kv_heads=2,
    head_dim=16,
    dtype="float32",
    chunk_tokens=4,
)
NS = "kv/015ddb1a42329eea/2994dc65e792353b65aa4235e696863f/"
GOLDEN = [
    NS + "b5ee4cfa3c517f3bcee07173a7957cabef63a109e02a03e6496acdc9b5b41e40",
    NS + "4c7d368c89e77356b082078250560a2adef316979a71d28f927bb5cd2ee09c0a",
]


def test_golden_vectors() -> None:
    assert LAYOUT.canonical() == (
        b'{"chunk_tokens":4,"dtype":"float32","extra":[],"first_layer":0,"head_dim":16,'
        b'"model_id":"org/tiny-llama","num_kv_heads":2,"num_layers":2,"revision":"0123abcd",'
        b'"scheme":"tensorcache-kv-v1","tp_rank":0,"tp_size":1}'
    )
    assert LAYOUT.prefix() == NS
    # 10 tokens: two full chunks; the partial tail has no key.
    assert chunk_keys(LAYOUT, list(range(10))) == GOLDEN
    assert chunk_keys(LAYOUT, [2**40, 7, 0, 1]) == [
        NS + "b979f57f3a26f4d8f271a14c437161c6b858b48068866d92fbeaf36107ed0ef8"
    ]


def test_derivation_matches_the_documented_formula() -> None:
    """Recomputed here from hashlib alone, as another implementation would."""
    root = hashlib.blake2b(b"tensorcache-kv-v1\x00" + LAYOUT.canonical(), digest_size=32)
    d0 = hashlib.blake2b(
        root.digest() + b"".join(t.to_bytes(8, "little") for t in range(4)), digest_size=32
    )
    d1 = hashlib.blake2b(
        d0.digest() + b"".join(t.to_bytes(8, "little") for t in range(4, 8)), digest_size=32
    )
    assert [NS + d0.hexdigest(), NS + d1.hexdigest()] == GOLDEN
    assert LAYOUT.digest() == hashlib.blake2b(LAYOUT.canonical(), digest_size=32).digest()
    model = hashlib.blake2b(
        json.dumps(["tensorcache-kv-v1", "org/tiny-llama"]).encode(), digest_size=8
    )
    assert NS.startswith(f"kv/{model.hexdigest()}/{LAYOUT.digest()[:16].hex()}/")
    assert root.digest() == root_digest(LAYOUT)


_CHILD = """
import json, sys
from tensorcache.kv import KVLayout, chunk_keys
layout = KVLayout("org/tiny-llama", "0123abcd", num_layers=2, num_kv_heads=2, head_dim=16,
                  dtype="float32", chunk_tokens=4)
print(json.dumps([hash("tensorcache"), chunk_keys(layout, list(range(10)))]))
"""


def test_same_keys_in_processes_with_different_hash_seeds() -> None:
    outputs = []
    for seed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        outputs.append(json.loads(run.stdout))
    # The seeds really differ (str hashes differ), the keys do not.
    assert len({h for h, _ in outputs}) > 1
    assert all(keys == GOLDEN for _, keys in outputs)


def test_chain_names_the_whole_prefix() -> None:
    a = chunk_digests(LAYOUT, [1, 2, 3, 4, 5, 6, 7, 8])
    b = chunk_digests(LAYOUT, [9, 2, 3, 4, 5, 6, 7, 8])
    assert a[1] != b[1]  # same second chunk, other first chunk: another key
    assert chunk_digests(LAYOUT, [1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9]) == a  # a prefix's keys
    assert chunk_keys(LAYOUT, [1, 2, 3]) == []  # no full chunk


def test_token_types_agree() -> None:
    import torch

    want = chunk_keys(LAYOUT, list(range(8)))
    assert chunk_keys(LAYOUT, tuple(range(8))) == want
    assert chunk_keys(LAYOUT, np.arange(8, dtype=np.int32)) == want
    assert chunk_keys(LAYOUT, np.arange(8, dtype=np.uint64)) == want
    assert chunk_keys(LAYOUT, torch.arange(8)) == want
    assert chunk_keys(LAYOUT, torch.arange(8).unsqueeze(0)) == want  # a batch of one


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": "org/other"},
        {"revision": "0123abce"},
        {"num_layers": 3},
        {"num_kv_heads": 4},
        {"head_dim": 32},
        {"dtype": "bfloat16"},
        {"chunk_tokens": 8},
        {"tp_size": 2},
        {"tp_size": 2, "tp_rank": 1},
        {"first_layer": 2},
        {"extra": (("rope_scaling", "linear:2.0"),)},
    ],
)
def test_every_layout_field_changes_the_keys(change: dict[str, object]) -> None:
    fields = {
        "model_id": "org/tiny-llama",
        "revision": "0123abcd",
        "num_layers": 2,
        "num_kv_heads": 2,
        "head_dim": 16,
        "dtype": "float32",
        "chunk_tokens": 4,
        **change,
    }
    other = KVLayout(**fields)  # type: ignore[arg-type]
    tokens = list(range(8))
    assert not set(chunk_keys(other, tokens)) & set(chunk_keys(LAYOUT, tokens))
    assert other.prefix() != LAYOUT.prefix()
    same_model = other.model_id == LAYOUT.model_id
    assert (other.model_prefix() == LAYOUT.model_prefix()) == same_model


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model_id": ""}, "model_id must not be empty"),
        ({"revision": 3}, "revision must be a str"),
        ({"num_layers": 0}, "num_layers must be >= 1"),
        ({"head_dim": True}, "head_dim must be an int"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"tp_rank": 2, "tp_size": 2}, "tp_rank must be < tp_size"),
        ({"chunk_tokens": -1}, "chunk_tokens must be >= 1"),
        ({"extra": (("b", "1"), ("a", "2"))}, "unique and sorted"),
        ({"extra": [("a", "1")]}, "must be a tuple"),
        ({"model_id": "m" * 300}, "at most 256"),
    ],
)
def test_bad_layouts_are_refused(fields: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "model_id": "m",
        "revision": "r",
        "num_layers": 1,
        "num_kv_heads": 1,
        "head_dim": 1,
        "dtype": "float16",
    }
    with pytest.raises(InvalidArgument, match=message):
        KVLayout(**{**base, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([1, -2, 3], "must be >= 0"),
        ([1.0, 2.0], "must be integers"),
        ([[1, 2], [3, 4]], "must be 1-d"),
        ("abc", "sequence of ints"),
    ],
)
def test_bad_tokens_are_refused(tokens: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        token_array(tokens)
