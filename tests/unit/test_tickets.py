"""Data-channel tickets, the pure logic (tensorcache/tickets.py): a fake clock, no I/O."""

from __future__ import annotations

import itertools

import pytest

from tensorcache.auth import READ, WRITE, Grant
from tensorcache.errors import InvalidArgument, Unauthenticated
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.tickets import TicketBook, normalize_host

TEAM = Grant("team-a", ("team-a/",), frozenset({READ, WRITE}))
OTHER = Grant("other", ("b/",), frozenset({READ}))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def book(clock: Clock) -> TicketBook:
    return TicketBook("node-0", ttl_s=30, rotate_s=600, clock=clock)


def test_a_ticket_admits_its_connection_once_with_its_grant(book: TicketBook) -> None:
    ticket = book.issue("127.0.0.1", 40000, TEAM, "client.example")
    assert book.admit(ticket, "127.0.0.1", 40000, [OTHER, TEAM]) == (TEAM, "client.example")
    with pytest.raises(Unauthenticated, match="already used"):
        book.admit(ticket, "127.0.0.1", 40000, [OTHER, TEAM])


def test_without_tokens_the_connection_has_no_grant(book: TicketBook) -> None:
    ticket = book.issue("127.0.0.1", 40000, None, "c")
    assert book.admit(ticket, "127.0.0.1", 40000, None) == (None, "c")


def test_a_ticket_from_another_address_is_refused(book: TicketBook) -> None:
    ticket = book.issue("127.0.0.1", 40000, None, "c")
    for host, port in (("127.0.0.1", 40001), ("127.0.0.2", 40000)):
        with pytest.raises(
            Unauthenticated, match=r"issued for a connection from 127\.0\.0\.1:40000"
        ):
            book.admit(ticket, host, port, None)
    # The refusals spent nothing: the right connection is still admitted.
    assert book.admit(ticket, "127.0.0.1", 40000, None)[0] is None


def test_an_expired_ticket_is_refused(book: TicketBook, clock: Clock) -> None:
    ticket = book.issue("10.0.0.5", 5000, None, "c")
    clock.now += 30
    with pytest.raises(Unauthenticated, match="expired"):
        book.admit(ticket, "10.0.0.5", 5000, None)


def test_forged_altered_and_malformed_tickets_are_refused(book: TicketBook) -> None:
    ticket = pb.DataTicket.FromString(book.issue("127.0.0.1", 40000, OTHER, "c"))
    body = pb.DataTicketBody.FromString(ticket.body)
    body.grant_name = "team-a"  # escalate: the MAC no longer matches
    altered = pb.DataTicket(body=body.SerializeToString(), mac=ticket.mac).SerializeToString()
    other_node = TicketBook("node-0", clock=Clock())  # same name, its own secret
    forged = other_node.issue("127.0.0.1", 40000, TEAM, "c")
    for bad in (altered, forged, b"", b"\xff\xff garbage"):
        with pytest.raises(Unauthenticated):
            book.admit(bad, "127.0.0.1", 40000, [OTHER, TEAM])
    unknown_key = pb.DataTicketBody.FromString(ticket.body)
    unknown_key.key_id = 99
    with pytest.raises(Unauthenticated, match="not issued by this node"):
        book.admit(
            pb.DataTicket(body=unknown_key.SerializeToString(), mac=ticket.mac).SerializeToString(),
            "127.0.0.1",
            40000,
            None,
        )


def test_a_ticket_for_another_node_is_refused(clock: Clock) -> None:
    secret = itertools.repeat(b"k" * 32)
    a = TicketBook("node-a", clock=clock, random=lambda n: next(secret)[:n])
    b = TicketBook("node-b", clock=clock, random=lambda n: next(secret)[:n])
    with pytest.raises(Unauthenticated, match="for node-a, not node-b"):
        b.admit(a.issue("127.0.0.1", 1, None, "c"), "127.0.0.1", 1, None)


def test_the_grant_is_the_tokens_file_of_now(book: TicketBook) -> None:
    ticket = book.issue("127.0.0.1", 40000, TEAM, "c")
    with pytest.raises(Unauthenticated, match="'team-a' is no longer known"):
        book.admit(ticket, "127.0.0.1", 40000, [OTHER])
    narrowed = Grant("team-a", ("team-a/x/",), frozenset({READ}))
    ticket = book.issue("127.0.0.1", 40001, TEAM, "c")
    assert book.admit(ticket, "127.0.0.1", 40001, [narrowed])[0] == narrowed
    # Issued without tokens, used after tokens came on: refused.
    bare = book.issue("127.0.0.1", 40002, None, "c")
    with pytest.raises(Unauthenticated, match="carries no token"):
        book.admit(bare, "127.0.0.1", 40002, [TEAM])


def test_rotation_keeps_the_previous_secret_only(book: TicketBook, clock: Clock) -> None:
    early = book.issue("127.0.0.1", 1, None, "c")
    clock.now += 599
    late = book.issue("127.0.0.1", 2, None, "c")  # signed just before rotation
    clock.now += 2  # rotated: a new secret signs, the previous still verifies
    fresh = book.issue("127.0.0.1", 3, None, "c")
    assert book.admit(late, "127.0.0.1", 2, None)[0] is None
    assert book.admit(fresh, "127.0.0.1", 3, None)[0] is None
    with pytest.raises(Unauthenticated):  # expired long ago in any case
        book.admit(early, "127.0.0.1", 1, None)
    assert pb.DataTicketBody.FromString(pb.DataTicket.FromString(fresh).body).key_id == 2


def test_spent_nonces_are_forgotten_once_their_tickets_expire(
    book: TicketBook, clock: Clock
) -> None:
    for port in range(1, 51):
        book.admit(book.issue("127.0.0.1", port, None, "c"), "127.0.0.1", port, None)
    assert book.spent() == 50
    clock.now += 31
    book.admit(book.issue("127.0.0.1", 99, None, "c"), "127.0.0.1", 99, None)
    assert book.spent() == 1


@pytest.mark.parametrize(
    ("host", "port", "field"),
    [
        ("node.example", 1, "client_host"),
        ("0.0.0.0", 1, "client_host"),
        ("::", 1, "client_host"),
        ("127.0.0.1", 0, "client_port"),
        ("127.0.0.1", 65536, "client_port"),
    ],
)
def test_issue_names_the_bad_field(book: TicketBook, host: str, port: int, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        book.issue(host, port, None, "c")


def test_addresses_compare_canonically() -> None:
    assert normalize_host("::ffff:127.0.0.1") == "127.0.0.1"
    assert normalize_host("fe80::1%eth0") == "fe80::1"
    assert normalize_host("2001:db8:0:0::1") == "2001:db8::1"


def test_ttl_must_be_shorter_than_rotation() -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        TicketBook("n", ttl_s=600, rotate_s=600)
