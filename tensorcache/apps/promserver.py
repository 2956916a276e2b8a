"""A private Prometheus server on loopback, for tests, benchmarks and the docs' figure.

Like etcdserver.py for etcd: Debian's ``prometheus`` binary on a free port
of 127.0.0.1, a data directory of its own, scraping the given targets at a
short interval; readiness is polled on ``/-/ready``, never assumed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorcache.apps.etcdserver import free_port


def find_prometheus() -> str | None:
    return shutil.which("prometheus")


@dataclass
class PromServer:
    """A running Prometheus; ``query``/``query_range`` call its HTTP API."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def query_range(
        self, expr: str, start: float, end: float, step_s: float
    ) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api(
            "query_range",
            query=expr,
            start=str(start),
            end=str(end),
            step=str(step_s),  # seconds, as a float
        )["result"]
        return result

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_prometheus(
    binary: str,
    data_dir: Path,
    jobs: dict[str, list[str]],
    *,
    rules: Path | None = None,
    interval_s: float = 0.5,
    timeout_s: float = 60.0,
) -> PromServer:
    """Start Prometheus scraping one job per entry of ``jobs`` (name -> host:port targets)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    interval = f"{int(interval_s * 1000)}ms"
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            for job, targets in jobs.items()
        ],
    }
    if rules is not None:
        config["rule_files"] = [str(rules)]
    cfg = data_dir / "prometheus.yml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    log = data_dir / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={data_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = PromServer(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"prometheus not ready in {timeout_s}s: {log.read_text()[-2000:]}")
        time.sleep(0.1)
