"""Eviction policies: victim order worked out by hand, then against a reference model."""

from __future__ import annotations

import random

import pytest

from tensorcache.node.policy import FIFOPolicy, LFUPolicy, LRUPolicy, make_policy

pytestmark = pytest.mark.unit


def drain(policy) -> list:
    """Evict everything, returning the victims in order."""
    out = []
    while (key := policy.victim()) is not None:
        out.append(key)
        policy.removed(key)
    return out


# -- make_policy ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("lru", LRUPolicy),
        ("lfu", LFUPolicy),
        ("fifo", FIFOPolicy),
        ("LRU", LRUPolicy),
        ("Lfu", LFUPolicy),
    ],
)
def test_make_policy_by_name(name, cls):
    policy = make_policy(name)
    assert type(policy) is cls
    assert policy.name == name.lower()


@pytest.mark.parametrize("name", ["", "arc", "lru ", "random"])
def test_make_policy_unknown_name_is_value_error(name):
    with pytest.raises(ValueError, match="unknown eviction policy") as info:
        make_policy(name)
    assert repr(name) in str(info.value)


def test_make_policy_returns_fresh_instances():
    a, b = make_policy("lru"), make_policy("lru")
    a.inserted("k")
    assert b.victim() is None


@pytest.mark.parametrize("name", ["lru", "lfu", "fifo"])
def test_empty_policy_has_no_victim(name):
    policy = make_policy(name)
    assert policy.victim() is None
    policy.inserted("a")
    policy.removed("a")
    assert policy.victim() is None


@pytest.mark.parametrize("name", ["lru", "lfu", "fifo"])
def test_unknown_keys_are_ignored(name):
    policy = make_policy(name)
    policy.accessed("ghost")
    policy.removed("ghost")
    assert policy.victim() is None
    policy.inserted("a")
    policy.accessed("ghost")
    policy.removed("ghost")
    assert drain(policy) == ["a"]


@pytest.mark.parametrize("name", ["lru", "lfu", "fifo"])
def test_victim_does_not_remove(name):
    policy = make_policy(name)
    policy.inserted("a")
    policy.inserted("b")
    assert policy.victim() == "a"
    assert policy.victim() == "a"


# -- LRU -----------------------------------------------------------------------


def test_lru_insert_order_without_access():
    p = LRUPolicy()
    for k in "abcd":
        p.inserted(k)
    assert drain(p) == ["a", "b", "c", "d"]


def test_lru_access_moves_to_young_end():
    p = LRUPolicy()
    for k in "abcd":
        p.inserted(k)
    p.accessed("a")  # b c d a
    p.accessed("c")  # b d a c
    assert p.victim() == "b"
    p.accessed("b")  # d a c b
    assert drain(p) == ["d", "a", "c", "b"]


def test_lru_reinsert_moves_to_young_end():
    p = LRUPolicy()
    for k in "abc":
        p.inserted(k)
    p.inserted("a")  # b c a
    assert drain(p) == ["b", "c", "a"]


def test_lru_removal_in_the_middle():
    p = LRUPolicy()
    for k in "abcde":
        p.inserted(k)
    p.removed("c")
    p.accessed("a")  # b d e a
    p.removed("b")  # d e a
    assert drain(p) == ["d", "e", "a"]


# -- FIFO ----------------------------------------------------------------------


def test_fifo_ignores_access():
    p = FIFOPolicy()
    for k in "abc":
        p.inserted(k)
    p.accessed("a")
    p.accessed("a")
    p.accessed("b")
    assert drain(p) == ["a", "b", "c"]


def test_fifo_reinsert_goes_to_the_back():
    p = FIFOPolicy()
    for k in "abc":
        p.inserted(k)
    p.inserted("a")  # a replace re-inserts: b c a
    p.removed("c")  # b a
    p.inserted("d")  # b a d
    assert drain(p) == ["b", "a", "d"]


# -- LFU -----------------------------------------------------------------------


def test_lfu_least_frequent_first():
    p = LFUPolicy()
    for k in "abc":
        p.inserted(k)  # a1 b1 c1
    p.accessed("a")
    p.accessed("a")  # a3
    p.accessed("b")  # b2
    assert drain(p) == ["c", "b", "a"]


def test_lfu_ties_broken_by_least_recent():
    p = LFUPolicy()
    for k in "abcd":
        p.inserted(k)  # all freq 1, in order a b c d
    p.accessed("c")  # c2
    p.accessed("a")  # a2 (more recent than c)
    # freq 1: b, d (b older); freq 2: c, a (c reached freq 2 first)
    assert drain(p) == ["b", "d", "c", "a"]


def test_lfu_tie_order_follows_last_touch_not_insertion():
    p = LFUPolicy()
    for k in "abc":
        p.inserted(k)
    for k in "cba":
        p.accessed(k)  # all freq 2; entered bucket 2 as c, b, a
    assert drain(p) == ["c", "b", "a"]


def test_lfu_access_empties_min_bucket():
    p = LFUPolicy()
    p.inserted("a")
    p.inserted("b")
    p.accessed("a")  # a2 b1
    p.accessed("b")  # a2 b2: bucket 1 emptied by an access
    assert p.victim() == "a"
    p.accessed("a")  # a3 b2
    assert drain(p) == ["b", "a"]


def test_lfu_removal_of_min_bucket_finds_next_bucket():
    p = LFUPolicy()
    for k in "abc":
        p.inserted(k)
    for _ in range(3):
        p.accessed("b")  # b4
    for _ in range(5):
        p.accessed("c")  # c6
    # a alone in bucket 1; removing it must skip the absent buckets 2 and 3
    p.removed("a")
    assert p.victim() == "b"
    p.removed("b")
    assert p.victim() == "c"
    p.removed("c")
    assert p.victim() is None


def test_lfu_insert_after_min_moved_up_resets_min():
    p = LFUPolicy()
    p.inserted("a")
    p.accessed("a")
    p.accessed("a")  # a3; min is 3
    assert p.victim() == "a"
    p.inserted("b")  # b1 is now the least frequent
    assert p.victim() == "b"
    assert drain(p) == ["b", "a"]


def test_lfu_replace_restarts_at_frequency_one():
    p = LFUPolicy()
    p.inserted("a")
    p.inserted("b")
    for _ in range(10):
        p.accessed("a")  # a11 b1
    p.accessed("b")  # b2
    p.inserted("a")  # replaced value: a back to 1
    assert drain(p) == ["a", "b"]


def test_lfu_remove_then_reinsert():
    p = LFUPolicy()
    p.inserted("a")
    p.accessed("a")
    p.removed("a")
    assert p.victim() is None
    p.inserted("b")
    p.inserted("a")
    p.accessed("b")
    assert drain(p) == ["a", "b"]


# -- randomized check against a brute-force reference --------------------------


class ReferencePolicy:
    """O(n) model: the victim is the key with the smallest rank tuple."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.clock = 0
        self.freq: dict[str, int] = {}
        self.touched: dict[str, int] = {}  # last insert or access
        self.inserted_at: dict[str, int] = {}

    def inserted(self, key):
        self.clock += 1
        self.freq[key] = 1
        self.touched[key] = self.clock
        self.inserted_at[key] = self.clock

    def accessed(self, key):
        if key not in self.freq:
            return
        self.clock += 1
        self.freq[key] += 1
        self.touched[key] = self.clock

    def removed(self, key):
        self.freq.pop(key, None)
        self.touched.pop(key, None)
        self.inserted_at.pop(key, None)

    def victim(self):
        if not self.freq:
            return None
        if self.name == "lru":
            return min(self.freq, key=lambda k: self.touched[k])
        if self.name == "fifo":
            return min(self.freq, key=lambda k: self.inserted_at[k])
        return min(self.freq, key=lambda k: (self.freq[k], self.touched[k]))


@pytest.mark.parametrize("name", ["lru", "lfu", "fifo"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_reference_model(name, seed):
    rng = random.Random(seed)
    policy, ref = make_policy(name), ReferencePolicy(name)
    universe = [f"k{i}" for i in range(12)]
    for _ in range(3000):
        op = rng.random()
        key = rng.choice(universe)
        if op < 0.3:
            policy.inserted(key)
            ref.inserted(key)
        elif op < 0.7:
            policy.accessed(key)
            ref.accessed(key)
        elif op < 0.85:
            policy.removed(key)
            ref.removed(key)
        else:
            victim = policy.victim()
            assert victim == ref.victim()
            if victim is not None:
                policy.removed(victim)
                ref.removed(victim)
        assert policy.victim() == ref.victim()
