"""``tensorcache etcd-restored``: the step after restoring etcd from a snapshot.

A restored etcd is back at the snapshot's revision, below epochs the nodes
have seen since (router/etcd_restore.py says what breaks). This asks the
nodes, through a router on the restored etcd, which epoch they are at, and
moves etcd's revision and the ring's epoch past the highest one plus a
margin (clients may be a few changes ahead of the nodes they last spoke
to). Procedure and reasons: docs/operations.md, "Backing up etcd".
"""

from __future__ import annotations

import argparse

from tensorcache.router import etcd_auth

#: Epochs added above the highest one a node reports (each ring change costs
#: about two revisions; a client is at most a few changes ahead of a node).
MARGIN = 1000


def add_arguments(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "etcd-restored",
        help="after restoring etcd from a snapshot: move its epoch past every epoch seen",
    )
    p.add_argument("--etcd", required=True, help="the restored etcd, http(s)://host:port")
    p.add_argument(
        "--router",
        default=None,
        help="a router on the restored etcd (host:port): its nodes report their epochs",
    )
    p.add_argument(
        "--past", type=int, default=0, help="an epoch known to have been seen (e.g. from logs)"
    )
    p.add_argument("--margin", type=int, default=MARGIN, help=f"added above (default {MARGIN})")
    p.add_argument("--prefix", default="/tensorcache/", help="the cluster's etcd key prefix")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    etcd_auth.add_arguments(p)
    p.set_defaults(fn=run)


def highest_node_epoch(router: str, timeout_s: float) -> int:
    """The highest epoch any node of ``router``'s ring reports (0: none answered)."""
    from tensorcache.client.api import connect

    with connect(router, timeout_s=timeout_s) as client:
        stats = client.stats()
        for s in stats:
            state = f"epoch {s.epoch}" if s.reachable else "unreachable"
            print(f"  node {s.name:<12} {s.address:<22} {state}", flush=True)
        return max((s.epoch for s in stats if s.reachable), default=0)


def run(args: argparse.Namespace) -> int:
    from tensorcache.router.etcd_restore import advance

    if args.margin < 0:
        raise ValueError(f"--margin must be >= 0, got {args.margin}")
    high = args.past
    if args.router:
        high = max(high, highest_node_epoch(args.router, args.timeout))
    if high <= 0:
        raise ValueError(
            "no epoch to move past: give --router (a router on the restored etcd, whose "
            "nodes report their epochs) or --past EPOCH"
        )
    done = advance(
        args.etcd,
        high + args.margin,
        prefix=args.prefix,
        timeout_s=args.timeout,
        auth=etcd_auth.from_args(args),
    )
    print(
        f"etcd {args.etcd}: revision {done.revision_before} -> epoch {done.epoch} "
        f"({done.writes} writes; highest epoch seen {high}). Now re-issue every "
        "invalidation made after the snapshot was taken.",
        flush=True,
    )
    return 0
