"""What ``tensorcache stat`` prints: the router's status line and the per-node table.

The demo prints the same table after its run.
"""

from __future__ import annotations

from tensorcache.client.config import NodeStats
from tensorcache.sizes import format_size


def stat_table(stats: list[NodeStats]) -> str:
    rows = [
        (
            "node",
            "address",
            "keys",
            "shards",
            "used",
            "capacity",
            "util",
            "pinned",
            "hit rate",
            "hits",
            "misses",
            "evictions",
            "moving",
        )
    ]
    for s in stats:
        if not s.reachable:
            rows.append(
                (
                    s.name,
                    s.address,
                    "-",
                    "-",
                    "-",
                    format_size(s.capacity),
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "unreachable",
                    "-",
                )
            )
            continue
        rows.append(
            (
                s.name,
                s.address,
                str(s.keys),
                str(s.shards),
                format_size(s.bytes_used),
                format_size(s.capacity),
                f"{s.utilization:.1%}",
                # Bytes never evicted, of the node's pinned quota (node/pins.py).
                f"{format_size(s.pinned_bytes)}/{format_size(s.pinned_capacity)}",
                f"{s.hit_rate:.1%}",
                str(s.hits),
                str(s.misses),
                str(s.evictions),
                # Copies on their way to new owners after ring changes (0: settled).
                str(s.pending),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def router_status_line(address: str, timeout: float) -> str:
    """One line on the router's health (Router.Status); says so if it cannot tell."""
    import os

    import grpc

    from tensorcache.auth import TOKEN_ENV
    from tensorcache.authgrpc import Credentials
    from tensorcache.grpcutil import CHANNEL_OPTIONS
    from tensorcache.proto import tensorcache_pb2 as pb
    from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc
    from tensorcache.tls import TLSFiles

    try:
        creds = Credentials(os.environ.get(TOKEN_ENV) or None, TLSFiles.from_env())
        with creds.channel(address, CHANNEL_OPTIONS) as ch:
            st = pb_grpc.RouterStub(ch).Status(pb.RouterStatusRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        return f"router {address}  state unknown ({exc.code().name}: {exc.details()})"
    line = (
        f"router {address}  state {st.state}  membership {st.membership}  "
        f"replicas {st.replicas or 1}  epoch {st.epoch}  members {st.members}"
    )
    return f"{line}\n  {st.detail}" if st.detail else line
