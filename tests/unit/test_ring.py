"""The consistent-hash ring: owners worked out by hand, then statistics on md5."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from tensorcache.errors import Unavailable
from tensorcache.ring import DEFAULT_WEIGHT_UNIT, Ring, RingMember

pytestmark = pytest.mark.unit

GiB = 2**30


def member(name: str, capacity: int = GiB, address: str | None = None) -> RingMember:
    return RingMember(name, address or f"10.0.0.1:{7000 + ord(name[-1])}", capacity)


def positions(points: dict[str, int]):
    """A hash function for hand-worked rings.

    Member points are hashed from "<name>-<i>" (i in 0..vnodes*weight-1) and
    looked up in ``points``; keys are decimal numbers and hash to themselves.
    A key owns to the first point clockwise (strictly above it, wrapping).
    """

    def hash_fn(text: str) -> int:
        if text in points:
            return points[text]
        return int(text)

    return hash_fn


# Three members, one point each:   a@100   b@200   c@300
THREE = {"a-0": 100, "b-0": 200, "c-0": 300}


def three_ring(epoch: int = 1) -> Ring:
    return Ring(
        epoch,
        [member("a"), member("b"), member("c")],
        vnodes=1,
        weight_unit=GiB,
        hash_fn=positions(THREE),
    )


# -- hand-worked placement ---------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "owner"),
    [
        ("0", "a"),
        ("50", "a"),
        ("99", "a"),
        ("101", "b"),
        ("150", "b"),
        ("199", "b"),
        ("201", "c"),
        ("299", "c"),
        ("301", "a"),
        ("1000000", "a"),
    ],  # past the last point: wraps to the first
)
def test_owner_by_hand(key, owner):
    assert three_ring().owner(key).name == owner


@pytest.mark.parametrize(
    ("key", "n", "owners"),
    [
        ("50", 1, ["a"]),
        ("50", 2, ["a", "b"]),
        ("50", 3, ["a", "b", "c"]),
        ("150", 3, ["b", "c", "a"]),
        ("250", 2, ["c", "a"]),
        ("250", 3, ["c", "a", "b"]),
        ("350", 2, ["a", "b"]),
        ("350", 3, ["a", "b", "c"]),
    ],
)
def test_owners_clockwise_by_hand(key, n, owners):
    assert [m.name for m in three_ring().owners(key, n)] == owners


def replica_ring(replicas: int, points: dict[str, int] = THREE) -> Ring:
    names = sorted({name.rsplit("-", 1)[0] for name in points})
    vnodes = len(points) // len(names)
    return Ring(
        1,
        [member(n) for n in names],
        vnodes=vnodes,
        weight_unit=GiB,
        hash_fn=positions(points),
        replicas=replicas,
    )


@pytest.mark.parametrize(
    ("key", "replicas", "names"),
    [
        ("50", 1, ["a"]),
        ("150", 2, ["b", "c"]),
        ("250", 2, ["c", "a"]),  # wraps past the last point
        ("350", 3, ["a", "b", "c"]),
        ("150", 5, ["b", "c", "a"]),  # more replicas than members: every member once
    ],
)
def test_replica_set_by_hand(key, replicas, names):
    ring = replica_ring(replicas)
    got = ring.replica_set(key)
    assert [m.name for m in got] == names
    assert got[0] == ring.owner(key)


def test_replica_set_skips_repeated_points_of_one_member():
    # clockwise: a@100 b@120 a@150 b@200 c@300 c@400
    points = {"a-0": 100, "a-1": 150, "b-0": 200, "b-1": 120, "c-0": 300, "c-1": 400}
    ring = replica_ring(2, points)
    assert [m.name for m in ring.replica_set("130")] == ["a", "b"]
    assert [m.name for m in ring.replica_set("250")] == ["c", "a"]  # c@300, c@400, a@100
    assert [m.name for m in ring.replica_set("110")] == ["b", "a"]


def test_replicas_must_be_positive():
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        Ring(1, [member("a")], replicas=0)


def test_invalidated_before_takes_the_newest_covering_prefix():
    ring = Ring(9, [member("a")], invalidations={"": 3, "m/": 7, "m/a/": 5, "x": 8})
    assert ring.invalidated_before("m/a/w") == 7  # "", "m/" and "m/a/" cover it; 7 is newest
    assert ring.invalidated_before("m/b") == 7
    assert ring.invalidated_before("xyz") == 8
    assert ring.invalidated_before("q") == 3  # "" covers every key
    assert Ring(9, [member("a")]).invalidated_before("q") == 0


def test_owners_capped_at_member_count():
    ring = three_ring()
    assert [m.name for m in ring.owners("150", 10)] == ["b", "c", "a"]


def test_owners_first_is_owner():
    ring = three_ring()
    for key in ("0", "150", "250", "999"):
        assert ring.owners(key, 2)[0] == ring.owner(key)


def test_owners_skip_repeated_points_of_one_member():
    # two points per member (vnodes=2, weight 1 as capacity == weight_unit)
    points = {"a-0": 100, "a-1": 150, "b-0": 200, "b-1": 120, "c-0": 300, "c-1": 400}
    ring = Ring(
        1,
        [member("a"), member("b"), member("c")],
        vnodes=2,
        weight_unit=GiB,
        hash_fn=positions(points),
    )
    # clockwise: a@100 b@120 a@150 b@200 c@300 c@400
    assert [m.name for m in ring.owners("110", 3)] == ["b", "a", "c"]
    assert [m.name for m in ring.owners("130", 3)] == ["a", "b", "c"]
    assert [m.name for m in ring.owners("250", 3)] == ["c", "a", "b"]
    assert [m.name for m in ring.owners("350", 2)] == ["c", "a"]
    assert [m.name for m in ring.owners("450", 3)] == ["a", "b", "c"]


def test_weight_gives_more_points_by_hand():
    # b has twice a's capacity: weight 2 -> points b-0 and b-1
    points = {"a-0": 100, "b-0": 200, "b-1": 50}
    ring = Ring(
        1,
        [member("a", 1000), member("b", 2000)],
        vnodes=1,
        weight_unit=1000,
        hash_fn=positions(points),
    )
    assert ring.weight(ring.member("a")) == 1
    assert ring.weight(ring.member("b")) == 2
    # clockwise: b@50 a@100 b@200
    assert ring.owner("10").name == "b"
    assert ring.owner("60").name == "a"
    assert ring.owner("150").name == "b"
    assert ring.owner("250").name == "b"


@pytest.mark.parametrize(
    ("capacity", "weight"),
    [
        (0, 1),
        (1, 1),
        (DEFAULT_WEIGHT_UNIT, 1),
        (2 * DEFAULT_WEIGHT_UNIT, 2),
        (int(2.6 * DEFAULT_WEIGHT_UNIT), 3),
        (16 * GiB, 64),
    ],
)
def test_weight_is_capacity_in_units_at_least_one(capacity, weight):
    ring = Ring(1, [member("a", capacity)])
    assert ring.weight(ring.members[0]) == weight


def test_single_member_owns_everything():
    ring = Ring(3, [member("solo")])
    for i in range(200):
        assert ring.owner(f"k{i}").name == "solo"
        assert [m.name for m in ring.owners(f"k{i}", 3)] == ["solo"]


def test_owners_of_zero_is_empty():
    assert three_ring().owners("150", 0) == []


# -- snapshot properties -----------------------------------------------------------


def test_empty_ring_is_unavailable():
    ring = Ring(7, [])
    assert len(ring) == 0
    with pytest.raises(Unavailable, match="epoch 7"):
        ring.owner("k")
    with pytest.raises(Unavailable, match="no nodes"):
        ring.owners("k", 2)


def test_duplicate_names_are_value_error():
    with pytest.raises(ValueError, match="duplicate"):
        Ring(1, [member("a"), member("b"), RingMember("a", "10.9.9.9:1", GiB)])


@pytest.mark.parametrize(("vnodes", "unit"), [(0, 1), (1, 0), (-1, 1)])
def test_vnodes_and_weight_unit_must_be_positive(vnodes, unit):
    with pytest.raises(ValueError, match=">= 1"):
        Ring(1, [member("a")], vnodes=vnodes, weight_unit=unit)


def test_members_sorted_and_looked_up_by_name():
    a, b, c = member("a"), member("b"), member("c")
    ring = Ring(4, [c, a, b])
    assert ring.epoch == 4
    assert ring.members == (a, b, c)
    assert len(ring) == 3
    assert "b" in ring
    assert "z" not in ring
    assert ring.member("b") is b
    assert ring.member("z") is None
    assert repr(ring) == "Ring(epoch=4, members=['a', 'b', 'c'])"


def test_owner_is_the_member_object():
    a = member("a", address="10.1.1.1:7070")
    ring = Ring(1, [a])
    assert ring.owner("k") is a


def test_members_are_frozen():
    m = member("a")
    with pytest.raises(AttributeError):
        m.name = "b"  # type: ignore[misc]


# -- md5 ring statistics -----------------------------------------------------------

KEYS = [f"model/layer{i}.weight" for i in range(20_000)]


def owner_names(ring: Ring, keys: list[str] = KEYS) -> list[str]:
    return [ring.owner(k).name for k in keys]


def test_owners_distinct_over_many_keys():
    ring = Ring(1, [member(f"node-{x}") for x in "abcde"])
    for key in KEYS[:2000]:
        names = [m.name for m in ring.owners(key, 3)]
        assert len(names) == 3
        assert len(set(names)) == 3
        assert names[0] == ring.owner(key).name


def test_double_capacity_owns_about_double_the_keys():
    ring = Ring(1, [member("node-a", GiB), member("node-b", 2 * GiB), member("node-c", GiB)])
    counts = Counter(owner_names(ring))
    ratio = counts["node-b"] / ((counts["node-a"] + counts["node-c"]) / 2)
    assert 2 * 0.85 <= ratio <= 2 * 1.15, counts


def test_adding_a_fourth_member_moves_about_a_quarter_only_to_it():
    three = [member(f"node-{x}") for x in "abc"]
    before = Ring(1, three)
    after = Ring(2, [*three, member("node-d")])
    old, new = owner_names(before), owner_names(after)
    moved = [(o, n) for o, n in zip(old, new, strict=True) if o != n]
    assert 0.15 <= len(moved) / len(KEYS) <= 0.35
    assert {n for _, n in moved} == {"node-d"}


def test_removing_a_member_moves_only_its_keys():
    four = [member(f"node-{x}") for x in "abcd"]
    before = Ring(1, four)
    after = Ring(2, four[:3])
    for o, n in zip(owner_names(before), owner_names(after), strict=True):
        if o != "node-d":
            assert n == o


def test_placement_does_not_depend_on_address():
    a = Ring(1, [member("node-a", address="10.0.0.1:1"), member("node-b", address="10.0.0.2:1")])
    b = Ring(9, [member("node-a", address="10.9.0.1:2"), member("node-b", address="10.9.0.2:2")])
    assert owner_names(a, KEYS[:3000]) == owner_names(b, KEYS[:3000])


def test_same_members_same_owners_across_instances():
    members = [member(f"node-{x}", (i + 1) * GiB) for i, x in enumerate("abcd")]
    r1 = Ring(1, members)
    r2 = Ring(5, list(reversed(members)))
    for key in KEYS[:3000]:
        assert [m.name for m in r1.owners(key, 2)] == [m.name for m in r2.owners(key, 2)]


PROBE = """
import json
from tensorcache.ring import Ring, RingMember
ring = Ring(1, [RingMember(f"node-{x}", "h:1", 2**30 * (i + 1)) for i, x in enumerate("abcd")])
print(json.dumps([ring.owner(f"model/layer{i}.weight").name for i in range(500)]))
"""


def test_same_owners_in_another_process_with_another_hash_seed():
    import json

    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    members = [RingMember(f"node-{x}", "h:1", GiB * (i + 1)) for i, x in enumerate("abcd")]
    assert json.loads(out.stdout) == owner_names(Ring(1, members), KEYS[:500])
