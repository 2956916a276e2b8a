"""The measured cases: each runs one operation against one system and yields a Row.

Timed regions hold the operation only. Untimed, around them: deleting the
key before each put (so every put stores anew), dropping the previous
result before each get, checking the bytes read back (CRC32C, once per
case) and freeing everything before the next case.

Memory is read per case: the client's and every server process's peak RSS
(VmHWM, reset with /proc/<pid>/clear_refs before the case) and, for the
client, the RSS just before it, so ``client_peak - client_base`` is what the
case itself cost the caller.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from bench.measure import (
    MIB,
    Budget,
    checksum,
    loadavg,
    mem_available,
    percentile,
    proc_kib,
    progress,
    random_array,
    rates,
    repeat,
    reset_peak,
    touched,
)
from bench.systems import System
from tensorcache.sizes import format_size

GB = 1e9

# Rough bytes of RAM a size needs while one system runs it (client + server,
# beyond the source array), to skip instead of pushing the host into OOM.
MEMORY_FACTOR = {"redis": 5.0, "memcpy": 1.2}
MEMORY_FACTOR_DEFAULT = 2.5


@dataclass(frozen=True)
class Plan:
    """What to run; the defaults are the full run, ``quick()`` the CI smoke run."""

    # 3, 4 and 8 GiB: the sizes of the cliff of issue #18 (a size the host
    # cannot hold is skipped with a note, see Runner._guard).
    sizes: tuple[int, ...] = (
        MIB,
        64 * MIB,
        512 * MIB,
        2048 * MIB,
        3072 * MIB,
        4096 * MIB,
        8192 * MIB,
    )
    seconds_per_case: float = 3.0
    min_repeats: int = 3
    max_repeats: int = 30
    max_case_seconds: float = 60.0
    small: int = 4096
    small_batch: int = 1000
    single_ops: int = 5000  # most single gets timed one by one (the latency sample)
    single_round: int = 200  # single gets per timed round (ops/s median over rounds)

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            sizes=(MIB, 8 * MIB),
            seconds_per_case=0.05,
            min_repeats=1,
            max_repeats=3,
            max_case_seconds=5.0,
            small_batch=100,
            single_ops=200,
            single_round=50,
        )

    def __post_init__(self) -> None:
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise ValueError("sizes must be > 0 bytes")
        if self.small <= 0 or self.small_batch < 1 or self.single_ops < 1 or self.single_round < 1:
            raise ValueError("small, small_batch, single_ops and single_round must be >= 1")
        self.budget()  # validates the repeat settings

    def budget(self) -> Budget:
        return Budget(
            self.seconds_per_case,
            self.min_repeats,
            self.max_repeats,
            max(self.max_case_seconds, self.seconds_per_case),
        )


@dataclass
class Row:
    """One measured number (and the memory around it); one line of the table."""

    system: str
    op: str  # get get_out put copy | get1 get_many put_many p50 p99 (4 KiB ops)
    size: int
    unit: str  # GB/s, ops/s, items/s, us
    median: float | None = None
    best: float | None = None
    repeats: int = 0
    seconds: list[float] = field(default_factory=list)
    note: str = ""
    verified: bool | None = None
    client_base_kib: int | None = None
    client_peak_kib: int | None = None
    server_peak_kib: dict[str, int] = field(default_factory=dict)
    server_rss_kib: dict[str, int] = field(default_factory=dict)
    stored_bytes: dict[str, int] | None = None  # per node, right after the puts
    left_bytes: int | None = None  # stored in all after the case deleted its key
    load1: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)

    @property
    def client_delta_kib(self) -> int | None:
        if self.client_peak_kib is None or self.client_base_kib is None:
            return None
        return self.client_peak_kib - self.client_base_kib


class Runner:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.budget = plan.budget()
        self.rows: list[Row] = []
        self.failures: list[str] = []  # errors and bad data, by case
        # Highest peak RSS of each process over all cases (KiB). Tracked here
        # because resetting VmHWM per case also resets the kernel's lifetime
        # figure (and ru_maxrss with it).
        self.peaks: dict[str, int] = {}

    # ------------------------------------------------------------ plumbing
    def _add(self, row: Row) -> Row:
        row.load1 = loadavg()
        self.rows.append(row)
        if row.note and row.median is None:
            value = row.note
        else:
            fmt = "{:,.3f}" if row.unit == "GB/s" else "{:,.0f}"
            value = f"{fmt.format(row.median)} {row.unit} over {row.repeats}"
        progress(f"{row.system:<16} {row.op:<8} {format_size(row.size):>10}  {value}")
        return row

    @contextlib.contextmanager
    def _watch(self, row: Row, pids: dict[str, int]) -> Iterator[None]:
        """Per-case peak RSS of this process and of the system's servers."""
        gc.collect()
        for pid in ("self", *pids.values()):
            reset_peak(pid)
        row.client_base_kib = proc_kib("self", "VmRSS")
        try:
            yield
        finally:
            row.client_peak_kib = proc_kib("self", "VmHWM")
            row.server_peak_kib = _by_name(pids, "VmHWM")
            row.server_rss_kib = _by_name(pids, "VmRSS")
            for name, kib in (("client", row.client_peak_kib), *row.server_peak_kib.items()):
                if kib is not None:
                    self.peaks[name] = max(kib, self.peaks.get(name, 0))

    def _guard(self, system: str, nbytes: int) -> str | None:
        need = MEMORY_FACTOR.get(system, MEMORY_FACTOR_DEFAULT) * nbytes + 512 * MIB
        avail = mem_available()
        if avail is not None and avail < need:
            return f"skipped: {format_size(avail)} RAM available, needs ~{format_size(need)}"
        return None

    def _fail(self, what: str, exc: BaseException | str) -> str:
        msg = f"{what}: {exc}"
        self.failures.append(msg)
        progress(f"ERROR {msg}")
        return f"error: {str(exc)[:60]}"

    # ------------------------------------------------------------ large tensors
    def memcpy(self, src: np.ndarray) -> None:
        """np.copyto into a destination allocated and touched before timing (the
        reference for ratios), then into a freshly allocated one (informational)."""
        n = src.nbytes
        row = Row("memcpy", "copy", n, "GB/s")
        note = self._guard("memcpy", n)
        if note:
            row.note = note
            self._add(row)
            return
        dst = touched(n)
        with self._watch(row, {}):
            times = repeat(functools.partial(np.copyto, dst, src), self.budget)
        row.median, row.best = rates(n / GB, times)
        row.repeats, row.seconds = len(times), times
        del dst
        self._add(row)

        # For reading the table: what a get pays when its result is fresh
        # memory (every page faulted in on first touch), as every get here is.
        row = Row("memcpy-fresh", "copy", n, "GB/s")
        with self._watch(row, {}):
            times = repeat(lambda: np.copyto(np.empty(n, np.uint8), src), self.budget)
        row.median, row.best = rates(n / GB, times)
        row.repeats, row.seconds = len(times), times
        self._add(row)

    def large(self, system: System, src: np.ndarray, crc: int) -> None:
        """put then get of one tensor of ``src.nbytes`` bytes."""
        n = src.nbytes
        key = f"bench/large/{n}"
        note = system.limit(n) or self._guard(system.name, n)
        if note:
            for op in ("put", "get"):
                self._add(Row(system.name, op, n, "GB/s", note=note))
            return
        pids = system.server_pids()
        put = Row(system.name, "put", n, "GB/s")
        get = Row(system.name, "get", n, "GB/s")
        try:
            system.prepare(n)
            system.delete(key)
            with self._watch(put, pids):
                times = repeat(
                    lambda: system.put(key, src), self.budget, lambda: system.delete(key)
                )
                stored = getattr(system, "stored_bytes", None)
                put.stored_bytes = stored() if stored else None
            put.median, put.best = rates(n / GB, times)
            put.repeats, put.seconds = len(times), times
        except Exception as exc:
            put.note = get.note = self._fail(f"{system.name} put {format_size(n)}", exc)
        self._add(put)
        if put.median is not None:
            holder: list[np.ndarray | None] = [None]

            def drop() -> None:
                holder[0] = None

            def fetch() -> None:
                holder[0] = system.get(key, n)

            try:
                with self._watch(get, pids):
                    times = repeat(fetch, self.budget, drop)
                got = holder[0]
                get.verified = got is not None and got.nbytes == n and checksum(got) == crc
                get.median, get.best = rates(n / GB, times)
                get.repeats, get.seconds = len(times), times
                if not get.verified:
                    self._fail(f"{system.name} get {format_size(n)}", "bytes differ from the put")
            except Exception as exc:
                get.note = self._fail(f"{system.name} get {format_size(n)}", exc)
            holder[0] = got = None
            if getattr(system, "fills_out", False):
                self._get_into(system, key, n, crc, pids)
        with contextlib.suppress(Exception):
            system.delete(key)
            system.finish(n)
        stored = getattr(system, "stored_bytes", None)
        if stored is not None:  # the cluster should be empty again
            with contextlib.suppress(Exception):
                get.left_bytes = sum(stored().values())
                if get.left_bytes:
                    get.note = f"{format_size(get.left_bytes)} still stored after delete"
        self._add(get)
        gc.collect()

    def _get_into(self, system: System, key: str, n: int, crc: int, pids: dict[str, int]) -> None:
        """get into one destination allocated and touched before timing, reused."""
        row = Row(system.name, "get_out", n, "GB/s")
        note = self._guard("memcpy", n)  # one more array of n bytes
        if note:
            row.note = note
            self._add(row)
            return
        dest = touched(n)
        get_into = system.get_into  # type: ignore[attr-defined]
        try:
            with self._watch(row, pids):
                times = repeat(functools.partial(get_into, key, dest), self.budget)
            row.verified = checksum(dest) == crc
            row.median, row.best = rates(n / GB, times)
            row.repeats, row.seconds = len(times), times
            if not row.verified:
                self._fail(f"{system.name} get→out {format_size(n)}", "bytes differ from the put")
        except Exception as exc:
            row.note = self._fail(f"{system.name} get→out {format_size(n)}", exc)
        del dest
        self._add(row)

    # ------------------------------------------------------------ 4 KiB tensors
    def small(self, system: System) -> None:
        """put_many/get_many of ``small_batch`` tensors and single gets (ops/s, latency)."""
        plan, size = self.plan, self.plan.small
        count = plan.small_batch if system.batched else min(plan.small_batch, plan.single_round)
        keys = [f"bench/small/{i:06d}" for i in range(count)]
        block = random_array(count * size, seed=size).reshape(count, size)
        values = {k: block[i] for i, k in enumerate(keys)}  # row views, no copies
        pids = system.server_pids()
        try:
            system.prepare(count * size)
            if system.batched:
                system.put_many(values)  # untimed first pass; timed puts replace
                self._batched(system, keys, values, block, pids)
            else:
                for k, v in values.items():
                    system.put(k, v)
                for op in ("put_many", "get_many"):
                    self._add(Row(system.name, op, size, "items/s", note="n/a (no batch op)"))
            self._singles(system, keys, block, pids)
        except Exception as exc:
            note = self._fail(f"{system.name} 4 KiB ops", exc)
            self._add(Row(system.name, "get1", size, "ops/s", note=note))
        with contextlib.suppress(Exception):
            for k in keys:
                system.delete(k)
            system.finish(count * size)

    def _batched(
        self,
        system: System,
        keys: list[str],
        values: dict[str, np.ndarray],
        block: np.ndarray,
        pids: dict[str, int],
    ) -> None:
        size, n = self.plan.small, len(keys)
        row = Row(system.name, "put_many", size, "items/s")
        with self._watch(row, pids):
            times = repeat(lambda: system.put_many(values), self.budget)
        row.median, row.best = rates(n, times)
        row.repeats, row.seconds = len(times), times
        self._add(row)

        row = Row(system.name, "get_many", size, "items/s")
        holder: list[list[np.ndarray | None]] = [[]]

        def fetch() -> None:
            holder[0] = system.get_many(keys, size)

        with self._watch(row, pids):
            times = repeat(fetch, self.budget)
        row.median, row.best = rates(n, times)
        row.repeats, row.seconds = len(times), times
        if system.name != "socket":  # the baseline keeps one buffer, not keys
            got = holder[0]
            row.verified = len(got) == n and all(
                a is not None and np.array_equal(a.reshape(-1), block[i]) for i, a in enumerate(got)
            )
            if not row.verified:
                self._fail(f"{system.name} get_many", "bytes differ from the put")
        self._add(row)

    def _singles(
        self, system: System, keys: list[str], block: np.ndarray, pids: dict[str, int]
    ) -> None:
        """Single-key gets, each timed: ops/s per round of gets, p50/p99 per get."""
        plan, size = self.plan, self.plan.small
        first = system.get(keys[0], size)
        ok = first is not None and np.array_equal(first.reshape(-1), block[0])
        if system.name != "socket" and not ok:
            self._fail(f"{system.name} get 4 KiB", "bytes differ from the put")
        row = Row(system.name, "get1", size, "ops/s")
        row.verified = ok if system.name != "socket" else None
        lat: list[float] = []
        rounds: list[float] = []
        budget = self.budget
        clock = time.perf_counter
        with self._watch(row, pids):
            spent = 0.0
            while len(lat) < plan.single_ops and budget.more(len(rounds), spent):
                t_round = clock()
                for k in keys[: plan.single_round]:
                    t0 = clock()
                    system.get(k, size)
                    lat.append(clock() - t0)
                dt = clock() - t_round
                rounds.append(dt)
                spent += dt
        m = min(plan.single_round, len(keys))
        row.median, row.best = rates(m, rounds)
        row.repeats, row.seconds = len(rounds), rounds
        self._add(row)
        for q in (50, 99):
            value = percentile(lat, q) * 1e6
            self._add(Row(system.name, f"p{q}", size, "us", median=value, repeats=len(lat)))


def _by_name(pids: dict[str, int], field_name: str) -> dict[str, int]:
    out = {}
    for name, pid in pids.items():
        kib = proc_kib(pid, field_name)
        if kib is not None:
            out[name] = kib
    return out


def large_source(nbytes: int) -> tuple[np.ndarray, int]:
    """The tensor every system puts for one size, and its checksum."""
    src = random_array(nbytes, seed=nbytes)
    return src, checksum(src)
