"""The wire fuzzer (fuzzwire.py) against a real node process on loopback.

First the committed corpus (fuzz_corpus.jsonl): each case must get exactly
its recorded outcome and an error message naming the field. Then a bounded,
seeded run of mutated cases (TENSORCACHE_FUZZ_CASES, default 400;
TENSORCACHE_FUZZ_SEED, default 0). After every case the node must be alive
and hold no reservation; after every test it must still return every entry
stored before, byte for byte; and it must never have logged a traceback (an
exception that escaped the error mapping).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

import tensorcache
from tensorcache.apps.cluster import LocalCluster, Proc

from .fuzzwire import Finding, generate, load_corpus, replay, reservations_released
from .helpers import assert_same

pytestmark = pytest.mark.integration

FUZZ_CASES = int(os.environ.get("TENSORCACHE_FUZZ_CASES", "400"))
FUZZ_SEED = int(os.environ.get("TENSORCACHE_FUZZ_SEED", "0"))
CORPUS = load_corpus()


@dataclass
class Target:
    proc: Proc
    data: str
    channel: grpc.Channel
    router: str
    residents: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One node (so every resident lives on the node under attack) and its residents."""
    cluster = LocalCluster(1, capacity="256MiB", log_dir=tmp_path_factory.mktemp("fuzz")).start()
    try:
        proc = next(iter(cluster.nodes.values()))
        data = cluster.ring().members[0].data_address
        residents = {f"resident/{i}": np.arange(50 + i, dtype=np.int64) * i for i in range(40)}
        with tensorcache.connect(cluster.router_address) as c:
            c.put_many(residents)
        with grpc.insecure_channel(proc.address) as channel:
            yield Target(proc, data, channel, cluster.router_address, residents)
    finally:
        cluster.stop()


def _unharmed(t: Target) -> None:
    assert t.proc.alive(), "the node died"
    with tensorcache.connect(t.router) as c:
        got = c.get_many(list(t.residents))
    for key, value in t.residents.items():
        assert_same(got[key], value)
    log = t.proc.log_path.read_text(errors="replace")
    assert "Traceback" not in log, f"the node logged a traceback:\n{log[-3000:]}"


def _replay_checked(t: Target, case) -> tuple[str, str]:
    outcome = replay(t.data, t.channel, case)
    assert t.proc.alive(), f"the node died on {case.name}"
    reservations_released(t.channel)
    return outcome


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_corpus_case(target, case):
    outcome, message = _replay_checked(target, case)
    assert outcome == case.expect, f"{case.name} ({case.why}): got {outcome}: {message}"
    assert case.detail in message, f"{case.name}: the error does not name {case.detail!r}"
    _unharmed(target)


def test_bounded_fuzz(target):
    """Mutated cases: every answer within the contract, no reservation left, nothing lost."""
    seen: Counter[str] = Counter()
    findings = []
    for case in generate(FUZZ_SEED, FUZZ_CASES):
        try:
            outcome, _ = _replay_checked(target, case)
        except Finding as exc:
            findings.append(f"{case.name}: {exc}\n  {case.to_json()[:400]}")
            continue
        seen[outcome.split(",")[0]] += 1
    assert not findings, "\n".join(findings)
    _unharmed(target)
    # The mutator must reach both sides of the parser: accepted requests,
    # refused ones on both doors, and connections cut mid-frame.
    assert seen["0"] and seen["OK"], seen
    assert seen["3"] and seen["INVALID_ARGUMENT"], seen
    assert seen["closed"], seen
