"""The bounded soak: ``python -m tests.soak.run`` (``make soak``).

etcd, 2 routers and 4 nodes at R = 2 on loopback, every node behind the
fault proxy; client processes (workload.py) write, read, invalidate and
``get_or_load`` for ``SOAK_SECONDS`` (default 120) while the nemesis injects
one fault at a time (nemesis.py). Then it heals everything, waits for the
ring, reads every key once more, stops every process with SIGTERM and checks:

* the history, with checker_history's checks (fresh reads, no torn or
  foreign values, invalidation, version order) and no lost acknowledged put
  (checks.check_lost: with nothing evicted, which is asserted, a miss after
  a completed, uninvalidated put is a loss);
* no operation past its deadline (workload.OP_DEADLINE_S + SLACK_S) or never
  ended; no error that is not a TensorCacheError;
* node RSS <= capacity * 1.1 + RUNTIME_ALLOWANCE, open fds <= FD_LIMIT for
  nodes and routers (sampled from /proc every second);
* ``evictions`` 0 and ``bytes_reserved`` 0 on every node at the end;
* every process we stopped with SIGTERM (drains, router restarts, the final
  stop) and every worker exited 0; the cluster recovered after every fault.

The seed is printed and settable (``SOAK_SEED``); the run's directory
(``SOAK_DIR``, default a new one under /tmp) keeps histories, logs, samples
and ``soak-summary.json``. ``SOAK_KINDS`` (comma list) narrows the faults to
some kinds (tests/soak/nemesis.py). Exit status 1 on any violation, 2 on bad settings.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import tensorcache
from tensorcache.apps import parentdeath
from tensorcache.sizes import parse_size
from tests.integration import checker_history as history
from tests.integration import checker_worker as cw

from . import checks, workload
from .cluster import SoakCluster
from .nemesis import KINDS, Nemesis

NODES = 4
REPLICAS = 2
#: Per node, per started 10 minutes of run: sized so the run never evicts
#: (lost puts are only measurable without evictions). Measured: a node fills
#: 256 MiB in about 17 minutes at this machine's rate (a 30-minute run at a
#: fixed 256 MiB evicted 26,753 entries from minute 17 on; the estimate of
#: "well under 100 MiB in 30 minutes" that stood here was wrong).
CAPACITY_PER_10_MIN = "256MiB"
#: Node memory beyond the byte budget: the interpreter, numpy, gRPC and its
#: threads (64 RPC workers), buffers of streams in flight. An idle node
#: measured ~75 MiB RSS here; the allowance doubles that.
RUNTIME_ALLOWANCE = 150 * 1024 * 1024
FD_LIMIT = 512  # nodes and routers; a node idles at ~30 fds, each connection adds ~1
SLACK_S = 10.0
SAMPLE_S = 1.0
STATS_EVERY_S = 5.0
FINAL_WAIT_S = 90.0
WORKERS = [  # (role, id, extra args)
    ("writer", 0, []),
    ("writer", 1, []),
    ("reader", 10, ["--invalidate", "ns-b/", "--invalidate-every", "4"]),
    ("reader", 11, []),
    ("loader", 20, []),
]
FINDINGS = Path("/tmp/soak_findings.md")


class Monitor(threading.Thread):
    """Samples RSS and fds of routers and nodes every second, node stats every few.

    Reads /proc and calls Stat: it starts no process (children must be
    started from the main thread: parentdeath).
    """

    def __init__(self, cluster: SoakCluster, out: Path) -> None:
        super().__init__(name="soak-monitor", daemon=True)
        self.c = cluster
        self.out = out
        self.stop_event = threading.Event()
        self.samples: list[dict[str, Any]] = []
        self.evictions: dict[str, int] = {}
        self.errors: Counter[str] = Counter()
        self.t0 = time.monotonic()

    def run(self) -> None:
        client: tensorcache.Client | None = None
        next_stats = time.monotonic()
        with open(self.out, "a", encoding="utf-8") as f:
            while not self.stop_event.wait(SAMPLE_S):
                for child in self.c.children():
                    if not child.alive():
                        continue
                    s = _proc_sample(child.pid)
                    if s is None:
                        continue
                    s.update(proc=child.name, kind=child.kind, t=time.monotonic() - self.t0)
                    self.samples.append(s)
                    f.write(json.dumps(s) + "\n")
                if time.monotonic() < next_stats:
                    continue
                next_stats = time.monotonic() + STATS_EVERY_S
                try:
                    client = client or workload.connect(self.c.router_address, 10.0)
                    for st in client.stats():
                        if st.reachable:
                            self.evictions[st.name] = max(
                                self.evictions.get(st.name, 0), st.evictions
                            )
                except Exception as exc:  # a fault in progress: the next round retries
                    self.errors[type(exc).__name__] += 1
        if client is not None:
            client.close()


def _proc_sample(pid: int) -> dict[str, Any] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = next(
        (int(ln.split()[1]) * 1024 for ln in status.splitlines() if ln.startswith("VmRSS")), 0
    )
    return {"pid": pid, "rss": rss, "fds": fds}


class Worker:
    def __init__(self, router: str, role: str, wid: int, extra: list[str], hist: Path, secs: float):
        self.name = f"{role}-{wid}"
        self.out = hist / f"{self.name}.jsonl"
        self.stderr = hist / f"{self.name}.stderr"
        with open(self.stderr, "wb") as err:
            self.popen = parentdeath.popen(
                [
                    sys.executable,
                    "-m",
                    "tests.soak.workload",
                    "--router",
                    router,
                    "--role",
                    role,
                    "--id",
                    str(wid),
                    "--out",
                    str(self.out),
                    "--seconds",
                    str(secs),
                    "--seed",
                    str(random.getrandbits(32)),
                    *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**os.environ, parentdeath.ENV: str(os.getpid())},
            )

    def finish(self, timeout: float) -> tuple[int | None, dict[str, Any]]:
        try:
            stdout, _ = self.popen.communicate(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.communicate()
            return None, {}
        lines = stdout.decode(errors="replace").strip().splitlines()
        try:
            report = json.loads(lines[-1]) if lines else {}
        except ValueError:
            report = {}
        return self.popen.returncode, report


def final_reads(router: str, keys: list[str], out: Path) -> None:
    """Read every key once (recorded like any get), in batches; bounded by FINAL_WAIT_S."""
    deadline = time.monotonic() + FINAL_WAIT_S
    with workload.connect(router, 30.0) as c, open(out, "a", encoding="utf-8") as f:
        log = cw.Log(f, "final")
        for i in range(0, len(keys), 128):
            if time.monotonic() > deadline:
                print(f"soak: final reads stopped after {i} of {len(keys)} keys", flush=True)
                return
            batch = keys[i : i + 128]
            start = time.monotonic_ns()
            try:
                got = c.get_many(batch)
            except Exception as exc:
                end = time.monotonic_ns()
                for k in batch:
                    log.write(op="get", key=k, start=start, end=end, error=cw.describe(exc))
                continue
            end = time.monotonic_ns()
            for k in batch:
                cw.record_get(log, k, start, end, got.get(k))


def settle_stats(router: str) -> tuple[dict[str, int], dict[str, int]]:
    """evictions and bytes_reserved per node, waiting (bounded) for reservations to drain."""
    deadline = time.monotonic() + 20.0
    with workload.connect(router, 30.0) as c:
        while True:
            stats = [s for s in c.stats() if s.reachable]
            reserved = {s.name: s.bytes_reserved for s in stats}
            if not any(reserved.values()) or time.monotonic() > deadline:
                return {s.name: s.evictions for s in stats}, reserved
            time.sleep(0.5)


def append_findings(
    seed: int,
    seconds: float,
    work: Path,
    violations: dict[str, list[str]],
    faults: list[dict[str, Any]],
) -> None:
    bad = {k: v for k, v in violations.items() if v}
    if not bad:
        return
    lines = [
        f"\n## soak seed {seed}, {seconds:.0f} s, {time.strftime('%Y-%m-%d %H:%M:%S')} "
        f"(dir {work})\n",
        "Faults (monotonic ns, in order):\n",
    ]
    lines += [
        f"- {e['wall']} [{e['start']}..{e['end']}] {e['kind']}: {e['detail']}\n" for e in faults
    ]
    for kind, msgs in bad.items():
        lines.append(f"\n{kind}: {len(msgs)}\n")
        lines += [f"- {m}\n" for m in msgs[:20]]
    with open(FINDINGS, "a", encoding="utf-8") as f:
        f.writelines(lines)


def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "120"))
    seed = int(os.environ.get("SOAK_SEED") or random.SystemRandom().getrandbits(32))
    kinds = tuple(k for k in os.environ.get("SOAK_KINDS", ",".join(KINDS)).split(",") if k)
    if (unknown := sorted(set(kinds) - set(KINDS))) or not kinds:
        print(f"soak: SOAK_KINDS: unknown kinds {unknown}; known: {', '.join(KINDS)}")
        return 2
    work = Path(os.environ.get("SOAK_DIR") or tempfile.mkdtemp(prefix=f"tensorcache-soak-{seed}-"))
    if work.is_dir() and any(work.iterdir()):
        # Histories are appended to: an old run's records would be checked
        # as this run's (its keys read as lost, its values as torn). Refuse
        # rather than delete what someone may still want.
        print(f"soak: SOAK_DIR {work} is not empty; give a new or empty directory")
        return 2
    work.mkdir(parents=True, exist_ok=True)
    hist = work / "histories"
    hist.mkdir(exist_ok=True)
    random.seed(seed)
    print(
        f"soak: seed {seed} (SOAK_SEED={seed} repeats the schedule), {seconds:.0f} s, dir {work}"
        + ("" if kinds == KINDS else f", faults {','.join(kinds)} only"),
        flush=True,
    )
    capacity = parse_size(CAPACITY_PER_10_MIN) * max(1, math.ceil(seconds / 600))
    cluster = SoakCluster(work, capacity=capacity, replicas=REPLICAS)
    workers: list[Worker] = []
    monitor = Monitor(cluster, work / "samples.jsonl")
    try:
        cluster.start(NODES)
        base = sorted(cluster.nodes)
        workers = [
            Worker(cluster.router_address, role, wid, extra, hist, seconds)
            for role, wid, extra in WORKERS
        ]
        monitor.start()
        nemesis = Nemesis(cluster, random.Random(seed), base, kinds)
        nemesis.run(time.monotonic() + seconds)

        worker_codes: dict[str, int | None] = {}
        reports = {}
        t_end = time.monotonic() + seconds + workload.OP_DEADLINE_S + SLACK_S
        for w in workers:
            code, report = w.finish(t_end - time.monotonic())
            worker_codes[w.name] = code
            reports[w.name] = report
        # Settled: every node healed and in the ring where it lives.
        recovered = []
        try:
            cluster.wait_whole(FINAL_WAIT_S)
        except TimeoutError as exc:
            recovered.append(f"recovery: at the end: {exc}")
        records = checks.load_records(sorted(hist.glob("*.jsonl")))
        keys = sorted({r["key"] for r in records if "key" in r} | set(cw.KEYS))
        final_reads(cluster.router_address, keys, hist / "final.jsonl")
        evictions, reserved = settle_stats(cluster.router_address)
        monitor.stop_event.set()
        monitor.join(10.0)
        for name, n in monitor.evictions.items():
            evictions[name] = max(evictions.get(name, 0), n)
        stop_codes = cluster.stop()
    except BaseException:
        for w in workers:
            if w.popen.poll() is None:
                w.popen.kill()
        cluster.kill_all()
        raise

    exits: dict[str, int | None] = {
        **stop_codes,
        **{f"worker {k}": v for k, v in worker_codes.items()},
    }
    for child in cluster.children():
        for i, code in enumerate(child.exits):
            exits[f"{child.name} (SIGTERM #{i + 1} during the run)"] = code

    records = checks.load_records(sorted(hist.glob("*.jsonl")))
    h = history.load(sorted(hist.glob("*.jsonl")))
    violations = history.check_all(h)
    violations["lost_puts"] = checks.check_lost(h)
    violations["hung_ops"] = checks.check_deadlines(records, workload.OP_DEADLINE_S + SLACK_S)
    errors = Counter(
        r.error.split(":", 1)[0] for r in (*h.puts, *h.gets, *h.invalidations) if r.error
    )
    violations["unexpected_errors"] = [
        f"{n} errors of type {k}" for k, n in errors.items() if k.startswith("unexpected")
    ]
    rss_limit = checks.rss_bound(capacity, RUNTIME_ALLOWANCE)
    violations["resources"] = checks.check_resources(
        monitor.samples, rss_limit=rss_limit, fd_limit=FD_LIMIT, kinds=["node", "router"]
    )
    violations["evictions"] = checks.check_evictions(evictions)
    violations["reserved_at_rest"] = [
        f"bytes_reserved: {n} {b} bytes still reserved at rest" for n, b in reserved.items() if b
    ]
    violations["exits"] = checks.check_exits(exits)
    violations["recovery"] = nemesis.failures + recovered

    loads = sum(1 for r in records if r.get("op") == "put" and r.get("loaded"))
    max_by: dict[str, dict[str, Any]] = {}
    for s in monitor.samples:
        m = max_by.setdefault(s["proc"], {"rss_mib": 0.0, "fds": 0})
        m["rss_mib"] = max(m["rss_mib"], round(s["rss"] / 2**20, 1))
        m["fds"] = max(m["fds"], s["fds"])
    summary = history.summarize(
        h,
        {k: v for k, v in violations.items()},
        extra={
            "seed": seed,
            "seconds": seconds,
            "processes": len(workers),
            "nodes": NODES,
            "replicas": REPLICAS,
            "loads": loads,
            "faults_by_kind": nemesis.counts(),
            "faults": nemesis.events,
            "lost": len(violations["lost_puts"]),
            "stale": len(violations["stale_reads"]),
            "evictions": evictions,
            "bytes_reserved": reserved,
            "max_resources": max_by,
            "rss_limit_mib": round(rss_limit / 2**20),
            "fd_limit": FD_LIMIT,
            "exits": exits,
            "monitor_errors": dict(monitor.errors),
            "proxy": {
                k: {kk: vv for kk, vv in v.items() if kk != "faults"}
                for k, v in cluster.proxy_stats.items()
            },
            "workers": reports,
        },
    )
    slowest = max(
        ((r["end"] - r["start"]) for r in records if "end" in r and "start" in r), default=0
    )
    summary["slowest_op_s"] = round(slowest / 1e9, 2)
    line = history.summary_line(summary)
    bad = sum(len(v) for v in violations.values())
    (work / "soak-summary.json").write_text(
        json.dumps(
            {"line": line, **summary, "first_violations": history.first(violations, 20)},
            indent=2,
            default=str,
        )
    )
    print(f"soak: {line}")
    print(
        f"soak: faults {summary['faults_by_kind']}; loads {loads}; lost {summary['lost']}, "
        f"stale {summary['stale']}; max RSS/fds {max_by}; slowest op {summary['slowest_op_s']}s"
    )
    if bad:
        append_findings(seed, seconds, work, violations, nemesis.events)
        print(
            f"soak: FAILED, {bad} violation(s) (seed {seed}, dir {work}):\n"
            f"{history.first(violations, 10)}",
            flush=True,
        )
        return 1
    print(f"soak: OK (seed {seed}, dir {work})", flush=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup on SIGTERM too
    sys.exit(main())
