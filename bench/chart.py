"""The PNG chart: grouped bars per size and system (get, put), and the 4 KiB ops."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cases import Row
from bench.report import LABELS, SYSTEM_ORDER, op_label
from tensorcache.sizes import format_size

COLORS = {
    "tensorcache": "#1f77b4",
    "tensorcache-colo": "#17becf",
    "flight": "#ff7f0e",
    "redis": "#d62728",
    "socket": "#7f7f7f",
    "memcpy": "#2ca02c",
    "memcpy-fresh": "#98df8a",
}
OUT_COLORS = {"tensorcache": "#6baed6", "tensorcache-colo": "#9edae5"}

# One series: (label, color, value of group i or None).
Series = tuple[str, str | None, Callable[[int], float | None]]


def write_png(path: Path, rows: list[Row], title: str, batch: int) -> Path | None:
    """Draw the chart; returns None (and draws nothing) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    have = {(r.system, r.op, r.size): r.median for r in rows if r.median}
    sizes = sorted({r.size for r in rows if r.op in ("get", "put")})
    fig, axes = plt.subplots(1, 3, figsize=(19, 6.5), gridspec_kw={"width_ratios": [3, 3, 2]})
    for ax, op in zip(axes[:2], ("get", "put"), strict=True):
        series: list[Series] = []
        for system in SYSTEM_ORDER:
            ops = ["copy"] if system.startswith("memcpy") else [op]
            if op == "get" and system in OUT_COLORS:
                ops.append("get_out")
            for o in ops:
                if not any((system, o, s) in have for s in sizes):
                    continue
                label = LABELS.get(system, system) + (" get→out" if o == "get_out" else "")
                color = OUT_COLORS[system] if o == "get_out" else COLORS.get(system)
                series.append((label, color, lambda i, k=(system, o): have.get((*k, sizes[i]))))
        _bars(ax, [format_size(s) for s in sizes], series)
        ax.set_title(f"{op} of one tensor (GB/s, higher is better)")
        ax.set_ylabel("GB/s (1e9 B/s), log scale")
    small_ops = ("get1", "get_many", "put_many")
    series = [
        (LABELS.get(s, s), COLORS.get(s), lambda i, s=s: have.get((s, small_ops[i], 4096)))
        for s in SYSTEM_ORDER
        if any((s, o, 4096) in have for o in small_ops)
    ]
    _bars(axes[2], [op_label(o, batch) for o in small_ops], series)
    axes[2].set_title("4 KiB tensors (ops/s or items/s, higher is better)")
    axes[2].set_ylabel("per second, log scale")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax: Any, groups: list[str], series: list[Series]) -> None:
    width = 0.85 / max(1, len(series))
    for j, (label, color, value) in enumerate(series):
        xs, ys = [], []
        for i in range(len(groups)):
            v = value(i)
            if v:
                xs.append(i - 0.425 + width * (j + 0.5))
                ys.append(v)
        bars = ax.bar(xs, ys, width, label=label, color=color)
        for b, v in zip(bars, ys, strict=True):
            ax.annotate(
                f"{v:.2f}" if v < 100 else f"{v / 1000:.0f}k",
                (b.get_x() + b.get_width() / 2, v),
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 8)  # room above the tallest bar for its label and the legend
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", ncols=2)
