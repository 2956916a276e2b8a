"""What a router's etcd watch has seen, and when that may be published as a view.

A pure state machine (no I/O): the watch (router/etcd_watch.py) feeds it
every key of the initial range and every event after it, in revision order;
each ``apply_*`` says whether the event was an *effective* change, one that
changes the view: a member added, removed or changed (a re-put of an
identical record is not a change), or an invalidation record written or
deleted (every write is a new epoch, so it always is). ring-epoch's own
events are never changes; they only move ``epoch``.

A view may be published only once ring-epoch holds the revision of the
last effective change seen (``epoch_written``); router/etcd_membership.py
explains why that makes every router publish the same view for an epoch.
"""

from __future__ import annotations

from typing import Protocol

from tensorcache.ring import RingMember
from tensorcache.router.etcd_records import (
    EtcdKeys,
    invalidated_prefix,
    parse_epoch,
    parse_member,
)
from tensorcache.router.membership import MembershipView


class KeyValue(Protocol):
    """The part of an etcd key-value (``aetcd.rtypes.KeyValue``) the state reads."""

    key: bytes
    value: bytes
    mod_revision: int


class WatchState:
    """Member records, invalidations and ring-epoch, as of ``applied_rev``."""

    def __init__(self, keys: EtcdKeys) -> None:
        self._keys = keys
        self.members: dict[str, RingMember] = {}
        self.invalidations: dict[str, int] = {}
        self.epoch: int | None = None
        self.change_rev = 0  # revision of the last effective change
        self.applied_rev = 0  # the last revision applied (where a watch resumes)

    def epoch_written(self) -> bool:
        """Whether ring-epoch covers the last effective change (the view may be published)."""
        return self.epoch is not None and self.epoch >= self.change_rev

    def view(self) -> MembershipView:
        """The view at ``epoch`` (only meaningful when ``epoch_written()``)."""
        return MembershipView(self.epoch or 0, self.ring(), self.table())

    def ring(self) -> tuple[RingMember, ...]:
        return tuple(self.members[name] for name in sorted(self.members))

    def table(self) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(self.invalidations.items()))

    def apply_put(self, kv: KeyValue) -> bool:
        """Apply one key's new value; True when the view changed (an effective change)."""
        keys = self._keys
        if kv.key == keys.epoch:
            epoch = parse_epoch(kv.key, kv.value)
            if epoch is not None:
                self.epoch = epoch
            return False
        if kv.key.startswith(keys.invalidations):
            prefix = invalidated_prefix(kv.key[len(keys.invalidations) :])
            if prefix is None:
                return False
            self.invalidations[prefix] = kv.mod_revision
            return True
        if not kv.key.startswith(keys.members):
            return False
        member = parse_member(kv.key, kv.value)
        if member is None:
            return False
        name = kv.key[len(keys.members) :].decode(errors="replace")
        if self.members.get(name) == member:
            return False
        self.members[name] = member
        return True

    def apply_delete(self, kv: KeyValue) -> bool:
        """Apply one key's deletion; True when the view changed."""
        keys = self._keys
        if kv.key.startswith(keys.invalidations):
            prefix = invalidated_prefix(kv.key[len(keys.invalidations) :])
            return prefix is not None and self.invalidations.pop(prefix, None) is not None
        if not kv.key.startswith(keys.members):
            return False
        name = kv.key[len(keys.members) :].decode(errors="replace")
        return self.members.pop(name, None) is not None
