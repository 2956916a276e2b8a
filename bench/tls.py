"""``python -m bench.tls``: what security costs on the data path.

One node (a real process, loopback) in six modes, the same client work in
each: plaintext; tokens (``--auth-tokens``: an AUTH frame per connection and
a grant check per key); mutual TLS (``--tls-*``: the data channel and gRPC
encrypted); TLS and tokens; and both TLS modes with
``--data-channel-encryption off`` ("dc-off": gRPC stays mutual TLS, the data
channel is plaintext and each connection opens with a ticket asked for over
gRPC). For each: put and get GB/s of one large tensor
over the data channel (the co-located fast path is off: it moves no bytes
over a socket, so TLS does not touch it), get GB/s over gRPC, and small
gets per second (4 KiB, one at a time: the per-request cost). Ratios are
against plaintext measured in the same run.

Every figure is a median over repetitions bounded in count and time
(bench/measure.py). Prints a table; writes ``bench/results/tls-<UTC>.json``.
Certificates are made at run time (trustme, the dev extra).
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import tensorcache
from bench.measure import MIB, Budget, loadavg, progress, repeat
from tensorcache.apps.cluster import LocalCluster
from tensorcache.tls import TLSFiles

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GB = 1e9
MODES = ("plaintext", "tokens", "tls", "tls+tokens", "tls,dc-off", "tls+tokens,dc-off")


def make_pki(root: Path) -> TLSFiles:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_path = root / "node.crt", root / "node.key", root / "ca.crt"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_path))
    return TLSFiles(str(cert), str(key), str(ca_path))


def run_mode(mode: str, root: Path, tls: TLSFiles, size: int, budget: Budget) -> dict[str, Any]:
    token = secrets.token_urlsafe(32)
    args: list[str] = []
    env: dict[str, str] = {}
    client: dict[str, Any] = {"local_fastpath": False}
    if "tokens" in mode:
        tokens = root / f"tokens-{mode}.json"
        entry = {"name": "bench", "token": token, "prefixes": [""], "ops": ["admin"]}
        tokens.write_text(json.dumps({"tokens": [entry]}))
        args += ["--auth-tokens", str(tokens)]
        env["TENSORCACHE_TOKEN"] = token
        client["token"] = token
    if "tls" in mode:
        args += ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca]
        env |= {"TENSORCACHE_TLS_CERT": tls.cert, "TENSORCACHE_TLS_KEY": tls.key}
        env["TENSORCACHE_TLS_CA"] = tls.ca
        client["tls"] = tls
    if "dc-off" in mode:
        args += ["--data-channel-encryption", "off"]
    big = np.frombuffer(np.random.default_rng(0).bytes(size), np.uint8).copy()
    small = np.arange(1024, dtype=np.float32)  # 4 KiB
    out: dict[str, Any] = {"mode": mode}
    if "dc-off" in mode:  # the router takes no such flag: only nodes have a data channel
        router_args = [a for a in args if a not in ("--data-channel-encryption", "off")]
    else:
        router_args = args
    with (
        LocalCluster(
            1,
            capacity=str(4 * size + 64 * MIB),
            log_dir=root / mode,
            env=env,
            node_args=args,
            router_args=router_args,
        ) as cluster,
        tensorcache.connect(cluster.router_address, stripe_size=2 * size, **client) as c,
        tensorcache.connect(
            cluster.router_address, stripe_size=2 * size, transport="grpc", **client
        ) as g,
    ):
        c.put("big", big)
        c.put("small", small)
        assert np.array_equal(c.get("big"), big)
        put_s = statistics.median(repeat(lambda: c.put("big", big), budget))
        get_s = statistics.median(repeat(lambda: c.get("big"), budget))
        grpc_s = statistics.median(repeat(lambda: g.get("big"), budget))
        n = 200

        def smalls() -> None:
            for _ in range(n):
                c.get("small")

        small_s = statistics.median(repeat(smalls, budget))
        # Measured the data channel, not the gRPC fallback.
        assert c.metrics().get("data_fallbacks", 0) == 0, c.metrics()
    out |= {
        "put_gbps": size / put_s / GB,
        "get_gbps": size / get_s / GB,
        "grpc_get_gbps": size / grpc_s / GB,
        "small_gets_per_s": n / small_s,
    }
    progress(f"{mode}: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke, seconds)")
    args = p.parse_args(argv)
    size = 16 * MIB if args.quick else 256 * MIB
    budget = (
        Budget(seconds=0.5, min_repeats=1, max_repeats=3, max_seconds=5)
        if args.quick
        else Budget(seconds=4, min_repeats=3, max_repeats=15, max_seconds=30)
    )
    started = time.time()
    load0 = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        root = Path(tmp)
        tls = make_pki(root)
        rows = [run_mode(m, root, tls, size, budget) for m in MODES]
    base = rows[0]
    print(f"\nData path with and without security: 1 node, loopback, {size // MIB} MiB tensor")
    print(f"(load {load0:.1f} -> {loadavg():.1f}; ratios vs plaintext in the same run)\n")
    head = f"{'mode':<20}{'put GB/s':>16}{'get GB/s':>16}{'gRPC get GB/s':>18}{'4KiB gets/s':>18}"
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = []
        for field, width in (("put_gbps", 16), ("get_gbps", 16), ("grpc_get_gbps", 18)):
            cells.append(f"{r[field]:.2f} ({r[field] / base[field]:.2f}x)".rjust(width))
        ratio = r["small_gets_per_s"] / base["small_gets_per_s"]
        cells.append(f"{r['small_gets_per_s']:.0f} ({ratio:.2f}x)".rjust(18))
        print(f"{r['mode']:<20}{''.join(cells)}")
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"tls-{stamp}.json"
    path.write_text(
        json.dumps(
            {"size": size, "quick": args.quick, "seconds": time.time() - started, "rows": rows},
            indent=2,
        )
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
