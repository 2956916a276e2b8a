"""Ratios, the printed table, the targets check, the JSON record and the chart.

A ratio is always "how many times better tensorcache is": for rates
(GB/s, ops/s, items/s) tensorcache ÷ peer, for latencies peer ÷ tensorcache.
So > 1 means tensorcache wins, whichever the unit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.cases import Row
from bench.measure import MIB
from tensorcache.sizes import format_size

TENSORCACHE = ("tensorcache", "tensorcache-colo")
PEERS = ("flight", "redis", "socket", "memcpy")
SYSTEM_ORDER = (*TENSORCACHE, "flight", "redis", "socket", "memcpy", "memcpy-fresh")
LABELS = {
    "tensorcache": "tensorcache (network)",
    "tensorcache-colo": "tensorcache (co-located)",
    "flight": "Arrow Flight",
    "redis": "Redis (redis-py)",
    "socket": "raw socket",
    "memcpy": "memcpy",
    "memcpy-fresh": "memcpy, fresh dest",
}
LARGE_OPS = ("get", "get_out", "put", "copy")
SMALL_OPS = ("get1", "get_many", "put_many", "p50", "p99")
TARGET_SIZE = 512 * MIB


def op_label(op: str, batch: int) -> str:
    return {
        "copy": "np.copyto",
        "get_out": "get→out",
        "get1": "get (1 key)",
        "get_many": f"get_many/{batch}",
        "put_many": f"put_many/{batch}",
        "p50": "get p50",
        "p99": "get p99",
    }.get(op, op)


def _lookup(rows: Iterable[Row]) -> dict[tuple[str, str, int], Row]:
    return {(r.system, r.op, r.size): r for r in rows if r.median is not None}


def add_ratios(rows: list[Row]) -> None:
    """Fill ``ratios`` of each tensorcache row against each peer's same case."""
    have = _lookup(rows)
    for r in rows:
        if r.system not in TENSORCACHE or r.median is None:
            continue
        for peer in PEERS:
            # get→out is compared with the peers' gets (the socket's lands in
            # touched memory too) and, like every large op, with memcpy.
            op = "get" if r.op == "get_out" else r.op
            if peer == "memcpy" and op in ("get", "put"):
                op = "copy"
            other = have.get((peer, op, r.size))
            if other is None or other.median is None or not other.median or not r.median:
                continue
            lower_is_better = r.unit == "us"
            ratio = other.median / r.median if lower_is_better else r.median / other.median
            r.ratios[peer] = ratio


def ordered(rows: list[Row]) -> list[Row]:
    """Large sizes (per size: get, put, copy), then the 4 KiB ops; systems in a fixed order."""

    def key(r: Row) -> tuple[int, int, int, int]:
        small = r.op in SMALL_OPS
        op_rank = (SMALL_OPS if small else LARGE_OPS).index(r.op)
        sys_rank = SYSTEM_ORDER.index(r.system) if r.system in SYSTEM_ORDER else 99
        return (int(small), 0 if small else r.size, op_rank, sys_rank)

    return sorted(rows, key=key)


# ---------------------------------------------------------------- table
def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.0f}"


def _value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:,.2f}" if unit in ("GB/s",) else f"{v:,.0f}"


def table(rows: list[Row], batch: int) -> str:
    head = [
        "system", "op", "size", "median", "unit", "best", "reps", "ok", "client Δpeak MiB",
        "server peak MiB", "xflight", "xredis", "xsocket", "xmemcpy", "load", "note",
    ]  # fmt: skip
    lines = [head]
    for r in ordered(rows):
        lines.append(
            [
                LABELS.get(r.system, r.system),
                op_label(r.op, batch),
                format_size(r.size),
                _value(r.median, r.unit),
                r.unit,
                _value(r.best, r.unit),
                str(r.repeats) if r.repeats else "-",
                "-" if r.verified is None else ("yes" if r.verified else "NO"),
                _mib(None if r.client_delta_kib is None else max(0, r.client_delta_kib)),
                "/".join(_mib(v) for v in r.server_peak_kib.values()) or "-",
                *(f"{r.ratios[p]:.2f}" if p in r.ratios else "" for p in PEERS),
                "-" if r.load1 is None else f"{r.load1:.1f}",
                r.note,
            ]
        )
    right = {3, 5, 6, 8, 9, 10, 11, 12, 13, 14}
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    prev_group: tuple[bool, int] | None = None
    in_order = ordered(rows)
    for j, line in enumerate(lines):
        if j > 0:
            r = in_order[j - 1]
            group = (r.op in SMALL_OPS, 0 if r.op in SMALL_OPS else r.size)
            if prev_group is not None and group != prev_group:
                out.append("")
            prev_group = group
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# ---------------------------------------------------------------- targets
@dataclass
class Target:
    name: str
    value: float | None  # the measured ratio or number
    threshold: float
    met: bool | None  # None: not measured in this run
    detail: str

    @property
    def mark(self) -> str:
        return {True: "✓", False: "✗", None: "-"}[self.met]


def targets(rows: list[Row]) -> list[Target]:
    have = _lookup(rows)
    sizes = sorted({r.size for r in rows if r.op in ("get", "put")})
    out: list[Target] = []
    if not sizes:
        return out
    t_size = TARGET_SIZE if TARGET_SIZE in sizes else max(s for s in sizes)
    at = format_size(t_size) + ("" if t_size == TARGET_SIZE else " (512 MiB not run)")
    big = max(sizes)

    def ratio_target(name: str, sysname: str, op: str, peer: str, threshold: float) -> None:
        r = have.get((sysname, op, t_size))
        v = r.ratios.get(peer) if r else None
        detail = "not measured" if v is None else f"{v:.2f}x at {at}"
        if r is not None and v is not None:
            peer_op = "copy" if peer == "memcpy" else "get" if op == "get_out" else op
            peer_row = have.get((peer, peer_op, t_size))
            if peer_row is not None and peer_row.median is not None:
                detail += f" ({r.median:.2f} vs {peer_row.median:.2f} GB/s)"
        out.append(Target(name, v, threshold, None if v is None else v >= threshold, detail))

    ratio_target("get ≥ 0.9x Flight do_get", "tensorcache", "get", "flight", 0.9)
    ratio_target("get ≥ 0.85x raw socket", "tensorcache", "get", "socket", 0.85)
    ratio_target("get ≥ 4x Redis GET", "tensorcache", "get", "redis", 4.0)
    ratio_target("put ≥ 1.0x Flight do_put", "tensorcache", "put", "flight", 1.0)
    if ("tensorcache-colo", "get", t_size) in have:
        ratio_target("co-located get ≥ 0.7x memcpy", "tensorcache-colo", "get", "memcpy", 0.7)
        if ("tensorcache-colo", "get_out", t_size) in have:
            ratio_target(
                "co-located get→out ≥ 0.7x memcpy", "tensorcache-colo", "get_out", "memcpy", 0.7
            )
    else:
        net = have.get(("tensorcache", "get", t_size))
        v = net.ratios.get("memcpy") if net else None
        out.append(
            Target(
                "co-located get ≥ 0.7x memcpy",
                None,
                0.7,
                None,
                "no co-located path in this build (ClientConfig has no local_fastpath)"
                + ("" if v is None else f"; the network path is {v:.2f}x memcpy"),
            )
        )

    r = have.get(("tensorcache", "get_many", 4096))
    v = r.median if r else None
    out.append(
        Target(
            "4 KiB get_many ≥ 50,000 items/s",
            v,
            50_000,
            None if v is None else v >= 50_000,
            "not measured" if v is None else f"{v:,.0f} items/s",
        )
    )
    r = have.get(("tensorcache", "get1", 4096))
    v = r.ratios.get("redis") if r else None
    detail = "not measured"
    if r is not None and v is not None:
        detail = f"{v:.2f}x ({r.median:,.0f} vs {r.median / v:,.0f} ops/s)"
    met = None if v is None else v >= 1.0
    out.append(Target("single 4 KiB get ≥ 1.0x redis-py GET", v, 1.0, met, detail))

    put = have.get(("tensorcache", "put", big))
    if put is not None and put.stored_bytes:
        for label, kib_by_node in (
            ("after the put", put.server_rss_kib),
            ("peak during puts", put.server_peak_kib),
        ):
            worst, detail = _node_memory(put.stored_bytes, kib_by_node)
            out.append(
                Target(
                    f"node RSS ≤ 1.1x stored + 100 MiB ({label}, {format_size(big)} put)",
                    worst,
                    1.0,
                    None if worst is None else worst <= 1.0,
                    detail,
                )
            )
    for sysname in TENSORCACHE:
        get = have.get((sysname, "get", big))
        if get is None or get.client_delta_kib is None:
            continue
        allowed = 1.1 * big + 64 * MIB
        used = get.client_delta_kib * 1024
        out.append(
            Target(
                f"client peak ≤ 1.1x result + 64 MiB ({LABELS[sysname]}, {format_size(big)} get)",
                used / allowed,
                1.0,
                used <= allowed,
                f"peak - RSS before = {format_size(used)}, allowed {format_size(allowed)}",
            )
        )
    return out


def _node_memory(stored: dict[str, int], kib: dict[str, int]) -> tuple[float | None, str]:
    """Worst node's RSS ÷ (1.1 x its stored bytes + 100 MiB), and a line per node."""
    worst: float | None = None
    parts = []
    for name in sorted(stored):
        if name not in kib:
            continue
        allowed = 1.1 * stored[name] + 100 * MIB
        rss = kib[name] * 1024
        worst = max(worst or 0.0, rss / allowed)
        parts.append(f"{name} {format_size(rss)} for {format_size(stored[name])}")
    return worst, "; ".join(parts) or "no node memory read"


def targets_text(items: list[Target]) -> str:
    if not items:
        return "targets: none evaluated (no sizes run)"
    lines = ["targets (not asserted):"]
    for t in items:
        lines.append(f"  {t.mark} {t.name}: {t.detail}")
    return "\n".join(lines)


# ---------------------------------------------------------------- files
def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)


def row_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    return [{**asdict(r), "client_delta_kib": r.client_delta_kib} for r in ordered(rows)]


def target_dicts(items: list[Target]) -> list[dict[str, Any]]:
    return [asdict(t) for t in items]
