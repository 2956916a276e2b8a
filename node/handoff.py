"""Warm handoff: a miss at a key's new owner is answered by its previous owner.

After a ring change a key's new owner may hold nothing for it yet (the
holders' pushes, node/rebalance.py, take a moment); the members of its
replica sets under earlier placements still do (as a demoted entry, or as
owners still). Within the handoff window (node/rings.py) a miss here asks
them, newest placement first, first that has it, with
``GetRequest.handoff``, stores what it gets with its version and stamp
intact (an explicit-version commit, so a newer put made meanwhile wins), and
serves it. The same question, metadata only, gives a first write of a key
here the version the key already has elsewhere, so versions keep increasing
across the change (docs/consistency.md, "Versions").

A handoff must never bring back what this node has since overwritten or
deleted: a key removed here within the window leaves a version floor in the
store, and the commit of an older copy is refused under the store's lock, so
a handoff in flight cannot land after a delete. (Overwrites need no floor:
the overwrite's version is newer, and the commit keeps it.)
Every failure of a previous owner is a miss, never an error to the client.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping

from tensorcache.errors import CapacityExceeded, TensorCacheError
from tensorcache.keys import entry_kind
from tensorcache.node.entry import MAX_VERSION
from tensorcache.node.payload import split_payload
from tensorcache.node.peers import Peers
from tensorcache.node.rings import RingView
from tensorcache.node.store import Entry, Holder, NewEntry, Store, StoreKey, entry_cost
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import RingMember

log = logging.getLogger("tensorcache.node")

# Per call to a previous owner: a handoff delays the get that missed, so a
# dead owner must cost little; a live one answers in milliseconds.
HANDOFF_TIMEOUT_S = 2.0
PER_KEY_TIMEOUT_S = 0.002

Found = tuple[pb.EntryGot, tuple[bytes, ...]]


def split_entries(
    reply: pb.GetReply, messages: list[bytes], *, head_only: bool
) -> list[Found | None]:
    """Pair each entry of a Get reply with its payload (None: not found, or bad bytes)."""
    if head_only:
        return [(g, ()) if g.found else None for g in reply.entries]
    sizes = [g.meta.nbytes if g.found and not g.meta.stripes else 0 for g in reply.entries]
    chunks, crcs = split_payload(messages, sizes)
    out: list[Found | None] = []
    for got, c, crc, size in zip(reply.entries, chunks, crcs, sizes, strict=True):
        if not got.found:
            out.append(None)
        elif size and crc != got.meta.crc32c:
            log.warning("handoff: checksum mismatch for %r; ignored", got.key[:64])
            out.append(None)
        else:
            out.append((got, tuple(bytes(x) for x in c)))
    return out


class Handoff:
    def __init__(
        self,
        store: Store,
        rings: RingView,
        peers: Peers,
        *,
        timeout_s: float = HANDOFF_TIMEOUT_S,
        me: Holder | None = None,
    ) -> None:
        self._me = frozenset((me,)) if me is not None else frozenset()
        self._store = store
        self._rings = rings
        self._peers = peers
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self.handoffs = 0

    # -- floors ------------------------------------------------------------------
    # A handoff or a push of a copy older than what this node wrote or deleted
    # since the ring changed must not bring it back: the store keeps each
    # removed key's version (a delete's tombstone) as its floor while the
    # window is open and refuses an older copy at commit, under its lock
    # (node/store.py). A copy at or above the floor is welcome: the value
    # written here may have moved on (pushed to another owner, dropped here)
    # and be coming back. (A plain "settled" mark ignored such a copy and
    # answered "kept newer" while holding nothing, and the sender dropped what
    # was then the last copy.) A key still held needs no floor: the commit
    # keeps the newer version. Floors cost nothing for keys only written,
    # so a million puts since the change do not switch handoffs off.
    def floor(self, key: StoreKey) -> int:
        """The version below which a copy of ``key`` is stale here (0: none)."""
        return self._store.floor(key)

    def _candidates(self, keys: Iterable[StoreKey]) -> dict[StoreKey, list[RingMember]]:
        out: dict[StoreKey, list[RingMember]] = {}
        if self._store.floors_lost():
            return out  # what was written or deleted here is not all known
        for key in keys:
            owners = self._rings.previous_owners(key[1])
            if owners:
                out[key] = owners
        return out

    def _suspect_owners(
        self, keys: Iterable[StoreKey]
    ) -> tuple[dict[StoreKey, list[RingMember]], dict[StoreKey, set[str]]]:
        """Whom to ask about hidden copies, and who of them must answer.

        Ask every other member that may hold the key: the previous owners,
        and the key's current co-replicas too: a copy hidden after a gap may
        be older than what they took while this node was away (the rule of
        ``previous_owners``, that a current replica got every write, holds
        only for writes made while this node was one). The co-replicas
        (by address) must answer: while one is silent the copy stays hidden.
        """
        ring = self._rings.current
        owners_of: dict[StoreKey, list[RingMember]] = {}
        must_answer: dict[StoreKey, set[str]] = {}
        for key in keys:
            owners = list(self._rings.previous_owners(key[1]))
            if ring is not None:
                co = [m for m in ring.replica_set(key[1]) if m.name != self._rings.name]
                must_answer[key] = {m.address for m in co}
                seen = {m.address for m in owners}
                owners += [m for m in co if m.address not in seen]
            owners_of[key] = owners
        return owners_of, must_answer

    # -- asking previous owners ---------------------------------------------------
    def _ask(
        self,
        wanted: dict[StoreKey, list[RingMember]],
        *,
        head_only: bool,
        every: bool,
        settled: dict[StoreKey, int] | None = None,
        unanswered: set[StoreKey] | None = None,
        must_answer: Mapping[StoreKey, set[str]] | None = None,
    ) -> dict[StoreKey, list[tuple[RingMember, Found]]]:
        """Ask previous owners, by rank, for ``wanted`` keys; answers with who gave them.

        ``every``: ask each owner of a key (metadata: versions); otherwise stop
        at the first that has it. ``settled`` collects, for keys some owner
        does not hold but settled since its last ring change, the highest
        version floor they answered (EntryGot.version of a settled miss).
        ``unanswered`` collects the keys for which a member named (by address)
        in ``must_answer`` did not answer.
        """
        found: dict[StoreKey, list[tuple[RingMember, Found]]] = {}
        pending = dict(wanted)
        rank = 0
        while pending:
            by_owner: dict[str, list[StoreKey]] = {}
            members: dict[str, RingMember] = {}
            for key, owners in pending.items():
                if rank < len(owners):
                    by_owner.setdefault(owners[rank].address, []).append(key)
                    members[owners[rank].address] = owners[rank]
            if not by_owner:
                break
            for address, keys in by_owner.items():
                req = pb.GetRequest(
                    epoch=0,
                    handoff=True,
                    head_only=head_only,
                    keys=[pb.EntryKey(key=k[1].encode(), kind=entry_kind(k[0])) for k in keys],
                )
                # A batch of misses (a get_many) gets more time than one key.
                timeout = self._timeout_s + PER_KEY_TIMEOUT_S * len(keys)
                try:
                    reply, messages = self._peers.get(address, req, timeout)
                    answers = split_entries(reply, messages, head_only=head_only)
                except TensorCacheError as exc:
                    log.info("handoff: previous owner %s did not answer: %s", address, exc)
                    if unanswered is not None and must_answer is not None:
                        unanswered.update(k for k in keys if address in must_answer.get(k, ()))
                    continue
                if len(answers) != len(keys):
                    log.warning(
                        "handoff: %s answered %d of %d keys", address, len(answers), len(keys)
                    )
                    if unanswered is not None and must_answer is not None:
                        unanswered.update(k for k in keys if address in must_answer.get(k, ()))
                    continue
                for key, answer, got in zip(keys, answers, reply.entries, strict=True):
                    if got.version > MAX_VERSION:
                        # A version no node assigns: taking it would stop this
                        # node's clock (node/entry.py). Not an answer.
                        log.warning(
                            "handoff: %s answered %r with version %d, beyond %d: ignored",
                            address,
                            key[1][:200],
                            got.version,
                            MAX_VERSION,
                        )
                        continue
                    if answer is None and got.settled and settled is not None:
                        settled[key] = max(settled.get(key, 0), got.version)
                    if answer is not None:
                        found.setdefault(key, []).append((members[address], answer))
                        if not every:
                            pending.pop(key, None)
            rank += 1
        return found

    def fetch(self, keys: Iterable[StoreKey]) -> dict[StoreKey, Entry]:
        """Answer missed ``keys`` from earlier owners, or from a copy held here hidden.

        Newest wins: the previous owners may hold different versions (a node
        back from a pause or partition holds old ones), so they are all asked
        for versions first, and the bytes come from the one with the newest,
        stored here with version and stamp intact. A copy this node holds
        hidden (its key lived elsewhere meanwhile: maybe stale, maybe the
        last copy) is served again when nobody has a newer one and nobody
        says the key was deleted since; otherwise it is dropped.

        Not published as key events: a handoff moves a value, it does not change it.
        """
        keys = list(keys)
        suspects = {k: e for k in keys if (e := self._store.suspect(k)) is not None}
        wanted = self._candidates(keys)
        # One previous owner and no hidden copy here: "newest wins" has one
        # contender, so its bytes are asked for at once, in one round trip
        # instead of two. A get that misses at a joining node waits for
        # these calls to a previous owner busy with its own scan, and on a
        # loaded host every extra hop is another wait for a core
        # (docs/performance.md, "Pacing").
        direct = {k: o for k, o in wanted.items() if len(o) == 1 and k not in suspects}
        for k in direct:
            del wanted[k]
        # A hidden copy is not served while one of the key's current
        # co-replicas is silent: it took the writes made while this node was
        # away. A silent previous owner (out of the replica set now) is a miss
        # among the answers, as for any handoff.
        suspect_owners, must_answer = self._suspect_owners(suspects)
        wanted.update(suspect_owners)
        if not wanted and not suspects and not direct:
            return {}
        floors: dict[StoreKey, int] = {}
        unanswered: set[StoreKey] = set()
        heads = (
            self._ask(
                wanted,
                head_only=True,
                every=True,
                settled=floors,
                unanswered=unanswered,
                must_answer=must_answer,
            )
            if wanted
            else {}
        )
        out = self._judge_suspects(suspects, heads, floors, unanswered)
        newest = {
            key: [max(answers, key=lambda a: a[1][0].version)[0]]
            for key, answers in heads.items()
            if key not in out
        }
        newest.update(direct)
        got = self._ask(newest, head_only=False, every=False) if newest else {}
        items: list[NewEntry] = []
        for key, answers in got.items():
            meta, chunks = answers[0][1][0], answers[0][1][1]
            if self._rings.invalidated(key[1], meta.stamp) and key[0] == pb.TENSOR:
                continue
            nbytes = sum(len(c) for c in chunks)
            cost = entry_cost(key[1], nbytes, meta.meta.ByteSize())
            items.append(
                NewEntry(
                    key,
                    meta.meta.SerializeToString(),
                    chunks,
                    cost,
                    version=meta.version,
                    stamp=meta.stamp,
                    checked=self._rings.placement_epoch,
                    holders=self._me,
                    pinned=meta.meta.pinned,  # the pin moves with the copy (node/pins.py)
                )
            )
        if not items:
            return out
        try:
            reservation = self._store.reserve(sum(it.cost for it in items))
        except CapacityExceeded as exc:
            log.warning("handoff: no room for %d entries: %s", len(items), exc)
            return out
        try:
            results = self._store.commit(reservation, items)  # floors apply there
        finally:
            self._store.release(reservation)
        stored = sum(version == it.version for it, (version, _) in zip(items, results, strict=True))
        with self._lock:
            self.handoffs += stored
        for it in items:
            entry = self._store.get(it.key, demoted_ok=True)
            if entry is not None:
                out[it.key] = entry
        if out:
            log.debug("handoff: %d entries from previous owners", len(out))
        return out

    def _judge_suspects(
        self,
        suspects: dict[StoreKey, Entry],
        heads: dict[StoreKey, list[tuple[RingMember, Found]]],
        floors: Mapping[StoreKey, int],
        unanswered: set[StoreKey],
    ) -> dict[StoreKey, Entry]:
        """Serve again the hidden copies nobody outdid; drop those that were.

        One whose current co-replica did not answer stays hidden: it may hold
        a newer copy. The next read or scan decides it.
        """
        out: dict[StoreKey, Entry] = {}
        epoch = self._rings.placement_epoch
        for key, entry in suspects.items():
            newer = any(a[1][0].version > entry.version for a in heads.get(key, []))
            deleted = entry.version < max(floors.get(key, 0), self._store.floor(key))
            if newer or deleted:
                self._store.drop(entry)  # a newer copy elsewhere, or the key was deleted
            elif key in unanswered:
                continue
            elif self._rings.owns(key[1]) and self._store.revive(entry, epoch, self._me):
                out[key] = entry
        if out:
            log.info("handoff: %d hidden copies served again (none newer elsewhere)", len(out))
        return out

    def known_versions(self, keys: Iterable[StoreKey]) -> dict[StoreKey, int]:
        """The versions previous owners hold for ``keys`` (absent: none known).

        Every version heard of moves this node's clock past it, invalidated
        ones included; those count as absent for conditional writes.
        """
        wanted = self._candidates(keys)
        if not wanted:
            return {}
        out: dict[StoreKey, int] = {}
        for key, answers in self._ask(wanted, head_only=True, every=True).items():
            best = max(answers, key=lambda a: a[1][0].version)[1][0]
            self._store.absorb(best.version)
            if not (key[0] == pb.TENSOR and self._rings.invalidated(key[1], best.stamp)):
                out[key] = best.version
        return out
