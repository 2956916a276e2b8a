"""``tensorcache stat --json`` and ``--watch``: the cluster's figures for scripts and people.

``--json`` prints one object: the router's status, every node's record
(``NodeStats`` fields plus hit rate and utilization) and cluster totals.
``--watch`` redraws a table in place (rich) every ``--interval`` seconds:
one row per node and a total, with get and put rates computed from the
change since the previous refresh; ``--count N`` stops after N refreshes
(scripts, tests). Both read what ``tensorcache stat`` reads: Router.Status
and each node's Stat, through a client.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tensorcache.client.config import NodeStats
from tensorcache.sizes import format_size

#: Counters summed into the cluster's total (gauges too: bytes, entries).
TOTALS = (
    "keys",
    "shards",
    "bytes_used",
    "bytes_reserved",
    "capacity",
    "hits",
    "misses",
    "evictions",
    "puts",
    "deletes",
    "pending",
    "demoted",
    "handoffs",
    "rereplicated",
)


def router_status(address: str, timeout: float) -> dict[str, Any]:
    """Router.Status as a dict; ``state`` "unknown" (with why) if it did not answer."""
    import grpc

    from tensorcache.grpcutil import CHANNEL_OPTIONS
    from tensorcache.proto import tensorcache_pb2 as pb
    from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc

    try:
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
            st = pb_grpc.RouterStub(ch).Status(pb.RouterStatusRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        return {
            "address": address,
            "state": "unknown",
            "detail": f"{exc.code().name}: {exc.details()}",
        }
    return {
        "address": address,
        "state": st.state,
        "detail": st.detail,
        "membership": st.membership,
        "replicas": st.replicas or 1,
        "epoch": st.epoch,
        "members": st.members,
    }


def totals(stats: list[NodeStats]) -> dict[str, Any]:
    up = [s for s in stats if s.reachable]
    out: dict[str, Any] = {name: sum(getattr(s, name) for s in up) for name in TOTALS}
    out["capacity"] = sum(s.capacity for s in stats)
    lookups = out["hits"] + out["misses"]
    out["hit_rate"] = out["hits"] / lookups if lookups else 0.0
    out["utilization"] = out["bytes_used"] / out["capacity"] if out["capacity"] else 0.0
    out["nodes"] = len(stats)
    out["reachable"] = len(up)
    return out


def as_json(router: dict[str, Any], epoch: int, stats: list[NodeStats]) -> str:
    nodes = [
        {**dataclasses.asdict(s), "hit_rate": s.hit_rate, "utilization": s.utilization}
        for s in stats
    ]
    return json.dumps(
        {"router": router, "epoch": epoch, "nodes": nodes, "totals": totals(stats)}, indent=2
    )


def _rate(now: int, before: int | None, seconds: float) -> str:
    if before is None or seconds <= 0:
        return "-"
    return f"{max(0, now - before) / seconds:,.0f}"


def table(
    router: dict[str, Any],
    stats: list[NodeStats],
    prev: dict[str, NodeStats],
    seconds: float,
    refresh: int,
) -> Group:
    """The watch view: a status line, then one row per node and the total."""
    state = router["state"]
    colour = {"ok": "green", "degraded": "red"}.get(state, "yellow")
    head = Text.assemble(
        f"router {router['address']}  state ",
        (state, f"bold {colour}"),
        f"  membership {router.get('membership', '-')}  replicas {router.get('replicas', '-')}"
        f"  epoch {router.get('epoch', '-')}  members {router.get('members', '-')}",
    )
    t = Table(
        caption=f"refresh {refresh}", caption_justify="right", box=box.SIMPLE_HEAD, expand=False
    )
    for name, justify in (
        ("node", "left"),
        ("keys", "right"),
        ("used", "right"),
        ("capacity", "right"),
        ("util", "right"),
        ("hit rate", "right"),
        ("gets/s", "right"),
        ("puts/s", "right"),
        ("evictions", "right"),
        ("moving", "right"),
    ):
        t.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]  # literals
    for s in stats:
        if not s.reachable:
            t.add_row(
                s.name,
                "-",
                "-",
                format_size(s.capacity),
                "-",
                "-",
                "-",
                "-",
                "unreachable",
                "-",
                style="red",
            )
            continue
        p = prev.get(s.name)
        t.add_row(
            s.name,
            f"{s.keys:,}",
            format_size(s.bytes_used),
            format_size(s.capacity),
            f"{s.utilization:.1%}",
            f"{s.hit_rate:.1%}",
            _rate(s.hits + s.misses, p.hits + p.misses if p else None, seconds),
            _rate(s.puts, p.puts if p else None, seconds),
            f"{s.evictions:,}",
            f"{s.pending:,}",
        )
    tot = totals(stats)
    up = [s for s in stats if s.reachable]
    before = [prev[s.name] for s in up if s.name in prev]
    both = len(before) == len(up) and bool(up)
    t.add_section()
    t.add_row(
        f"total ({tot['reachable']}/{tot['nodes']})",
        f"{tot['keys']:,}",
        format_size(tot["bytes_used"]),
        format_size(tot["capacity"]),
        f"{tot['utilization']:.1%}",
        f"{tot['hit_rate']:.1%}",
        _rate(
            tot["hits"] + tot["misses"],
            sum(p.hits + p.misses for p in before) if both else None,
            seconds,
        ),
        _rate(tot["puts"], sum(p.puts for p in before) if both else None, seconds),
        f"{tot['evictions']:,}",
        f"{tot['pending']:,}",
        style="bold",
    )
    if router.get("detail"):
        return Group(head, Text(f"  {router['detail']}", style="red"), t)
    return Group(head, t)


def watch(
    router: str,
    read: Callable[[], list[NodeStats]],
    *,
    interval_s: float,
    count: int | None,
    timeout_s: float,
    console: Console | None = None,
) -> int:
    """Redraw the view every ``interval_s`` until Ctrl-C or ``count`` refreshes."""
    if interval_s <= 0:
        raise ValueError(f"interval must be > 0 seconds, got {interval_s}")
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    prev: dict[str, NodeStats] = {}
    last = time.monotonic()
    refresh = 0
    with Live(console=console or Console(), auto_refresh=False, transient=False) as live:
        try:
            while count is None or refresh < count:
                status = router_status(router, timeout_s)
                stats = read()
                now = time.monotonic()
                refresh += 1
                live.update(table(status, stats, prev, now - last, refresh), refresh=True)
                prev = {s.name: s for s in stats if s.reachable}
                last = now
                if count is not None and refresh >= count:
                    break
                time.sleep(interval_s)
        except KeyboardInterrupt:
            pass
    return 0
