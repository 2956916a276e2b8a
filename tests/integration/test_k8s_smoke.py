"""The dev overlay, run: its exact command lines as local processes on loopback.

``kubectl kustomize k8s/overlays/dev`` gives the pods; each container's
command, args and env are taken as written, with only what a cluster would
supply substituted: downward-API values (pod name, namespace, pod IP ->
127.0.0.1), Service and pod DNS names -> 127.0.0.1, every container port ->
a free local port (each pod has its own ports in a cluster; here they share
one loopback), volume mounts -> temporary directories, images -> the local
binaries. Readiness is what the manifests' probes ask (grpc.health.v1 Check
of the probe's service, HTTP GET, TCP connect), polled within the probe's
own failure budget. Then a client works through the router Service's port,
one node gets SIGTERM as the kubelet sends it, and its drain must end (exit
0) within the manifest's terminationGracePeriodSeconds with every key still
readable, byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tensorcache
from tensorcache.apps import parentdeath
from tensorcache.apps.etcdserver import free_port
from tensorcache.sizes import parse_size

from .helpers import assert_same, poll, sample
from .k8s_render import (
    DEV,
    EXAMPLE,
    NAMESPACE,
    Obj,
    Pod,
    by_kind,
    container_env,
    expand,
    flag,
    pods,
    quantity_bytes,
    render,
    selects,
)

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# host:port inside an argument or env value (URLs included).
HOST_PORT = re.compile(r"(?<![A-Za-z0-9.-])([A-Za-z0-9][A-Za-z0-9.-]*):(\d+)")


@dataclass
class LocalPod:
    """One pod of the rendered overlay, as a local process."""

    pod: Pod
    container: Obj
    ports: dict[int, int]  # containerPort -> local port
    mounts: dict[str, Path]  # mountPath -> local directory
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    argv: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.pod.name

    def port(self, ref: int | str) -> int:
        """The local port of a container port, by number or name."""
        return self.ports[self.pod.container_ports()[ref]]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log else ""


class World:
    """An overlay's pods and Services on one loopback interface (test_k8s_smoke_tls.py
    runs the cert-manager overlay with it)."""

    def __init__(
        self,
        objects: list[Obj],
        tmp: Path,
        etcd_binary: str,
        secrets: Mapping[str, Mapping[str, bytes]] | None = None,
    ) -> None:
        """``secrets``: Secret name -> its files, written into every volume of
        that Secret as the kubelet would (a Secret not given fails the test)."""
        self.tmp = tmp
        self.etcd_binary = etcd_binary
        self.services = by_kind(objects, "Service")
        self.pods: dict[str, LocalPod] = {}
        for pod in pods(objects):
            (container,) = pod.containers()
            ports = {p["containerPort"]: free_port() for p in container.get("ports", [])}
            volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
            mounts = {}
            for m in container.get("volumeMounts", []):
                mounts[m["mountPath"]] = tmp / pod.name / m["name"]
                mounts[m["mountPath"]].mkdir(parents=True)
                secret = volumes.get(m["name"], {}).get("secret")
                if secret is not None:
                    name = secret["secretName"]
                    if secrets is None or name not in secrets:
                        pytest.fail(
                            f"{pod.name} mounts Secret {name}, which the test does not give"
                        )
                    for file, data in secrets[name].items():
                        (mounts[m["mountPath"]] / file).write_bytes(data)
            self.pods[pod.name] = LocalPod(pod, container, ports, mounts)
        self.headless = {p.pod.workload["spec"].get("serviceName") for p in self.pods.values()} - {
            None
        }

    # -------------------------------------------------------------- addresses
    def service_pods(self, name: str) -> list[LocalPod]:
        (svc,) = [s for s in self.services if s["metadata"]["name"] == name]
        return [p for p in self.pods.values() if selects(svc["spec"]["selector"], p.pod.labels)]

    def service_port(self, name: str, port: int) -> int:
        """The local port behind ``<service>:<port>`` (its first pod's target port)."""
        (svc,) = [s for s in self.services if s["metadata"]["name"] == name]
        (spec,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
        return self.service_pods(name)[0].port(spec.get("targetPort", port))

    def _resolve(self, me: LocalPod, host: str, port: int) -> int:
        """The local port a connection from ``me`` to ``host:port`` reaches."""
        if host in ("0.0.0.0", LOOPBACK, me.name):
            if port not in me.ports:
                pytest.fail(f"{me.name} uses port {port}, which its container does not declare")
            return me.ports[port]
        labels = host.split(".")
        suffixes = ([], [NAMESPACE], [NAMESPACE, "svc"], [NAMESPACE, "svc", "cluster", "local"])
        for rest in suffixes:
            service = any(s["metadata"]["name"] == labels[0] for s in self.services)
            if labels[1:] == rest and service:
                return self.service_port(labels[0], port)
            if labels[2:] == rest and labels[1] in self.headless and labels[0] in self.pods:
                return self.pods[labels[0]].ports[port]  # <pod>.<headless service>
        pytest.fail(f"{me.name}: cannot resolve {host}:{port} like cluster DNS would")

    def _pod_dns_name(self, host: str) -> bool:
        """``<pod>.<headless service>[.<namespace>[.svc[.cluster.local]]]``."""
        labels = host.split(".")
        suffixes = ([], [NAMESPACE], [NAMESPACE, "svc"], [NAMESPACE, "svc", "cluster", "local"])
        return (
            len(labels) >= 2
            and labels[0] in self.pods
            and labels[1] in self.headless
            and labels[2:] in suffixes
        )

    def localize(self, me: LocalPod, text: str) -> str:
        """An argument or env value with cluster addresses, ports and paths made local."""

        def host_port(m: re.Match[str]) -> str:
            return f"{LOOPBACK}:{self._resolve(me, m.group(1), int(m.group(2)))}"

        text = HOST_PORT.sub(host_port, text)
        flag_port = re.fullmatch(r"(--[a-z-]*port)=(\d+)", text)
        if flag_port:  # a port this container listens on
            if int(flag_port.group(2)) not in me.ports:
                pytest.fail(f"{me.name}: {text} is not a declared container port")
            return f"{flag_port.group(1)}={me.ports[int(flag_port.group(2))]}"
        if text.endswith("=0.0.0.0"):  # bind loopback only
            return text.removesuffix("0.0.0.0") + LOOPBACK
        bare = re.fullmatch(r"(--[a-z-]+=)?([A-Za-z0-9.-]+)", text)
        if bare and self._pod_dns_name(bare.group(2)):  # a pod's own name, e.g. --advertise
            return f"{bare.group(1) or ''}{LOOPBACK}"
        for mount in sorted(me.mounts, key=len, reverse=True):  # one mount, the deepest
            m = re.match(rf"^((?:--[a-z-]+=)?){re.escape(mount)}(/.*)?$", text)
            if m:
                return f"{m.group(1)}{me.mounts[mount]}{m.group(2) or ''}"
        return text

    # -------------------------------------------------------------- processes
    def start(self, lp: LocalPod, extra_env: dict[str, str] | None = None) -> None:
        env = container_env(lp.pod, lp.container, pod_ip=LOOPBACK)
        args = [expand(a, env) for a in lp.container["command"] + lp.container.get("args", [])]
        command, args = args[0], [self.localize(lp, a) for a in args[1:]]
        env = {k: self.localize(lp, v) for k, v in env.items()}
        executable = {
            "tensorcache": [sys.executable, "-m", "tensorcache"],
            "etcd": [self.etcd_binary],
            "python": [sys.executable],
        }[command]
        lp.argv = [*executable, *args]
        # The image's environment: what the Dockerfile sets, nothing from here.
        env |= {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.tmp / lp.name),
            "PYTHONUNBUFFERED": "1",
            parentdeath.ENV: str(os.getpid()),
            **(extra_env or {}),
        }
        lp.log = self.tmp / f"{lp.name}.log"
        with open(lp.log, "ab") as log:
            lp.proc = parentdeath.popen(
                lp.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )

    def stop_all(self) -> None:
        for lp in self.pods.values():
            if lp.alive():
                assert lp.proc is not None
                lp.proc.kill()
                lp.proc.wait(10)


# ------------------------------------------------------------------ probes
def health(port: int, service: str) -> int | str:
    """grpc.health.v1 Check, as the kubelet's gRPC probe sends it (1 s timeout)."""
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
        except grpc.RpcError as exc:
            return exc.code().name  # type: ignore[no-any-return]
    return reply.status  # type: ignore[no-any-return]


def probe_ok(lp: LocalPod, probe: Obj) -> bool:
    if "grpc" in probe:
        return health(lp.port(probe["grpc"]["port"]), probe["grpc"].get("service", "")) == SERVING
    if "httpGet" in probe:
        url = f"http://{LOOPBACK}:{lp.port(probe['httpGet']['port'])}{probe['httpGet']['path']}"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return 200 <= reply.status < 400
        except (urllib.error.URLError, OSError):
            return False
    if "tcpSocket" in probe:
        with (
            contextlib.suppress(OSError),
            socket.create_connection((LOOPBACK, lp.port(probe["tcpSocket"]["port"])), timeout=1),
        ):
            return True
        return False
    raise AssertionError(f"unsupported probe {probe}")


def wait_ready(lp: LocalPod) -> None:
    """Startup, then readiness probe, within the startup probe's budget."""
    c = lp.container
    startup = c["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)

    def check(probe: Obj) -> bool:
        if not lp.alive():
            pytest.fail(f"{lp.name} exited ({lp.proc and lp.proc.poll()}):\n{lp.log_tail()}")
        return probe_ok(lp, probe)

    poll(lambda: check(startup), timeout=budget, interval=0.1, what=f"{lp.name} started")
    poll(
        lambda: check(c["readinessProbe"]),
        timeout=budget,
        interval=0.1,
        what=f"{lp.name} ready",
    )


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ------------------------------------------------------------------ the test
@pytest.fixture
def world(tmp_path: Path, etcd_binary: str) -> Iterator[World]:
    w = World(render(DEV), tmp_path, etcd_binary)
    try:
        yield w
    finally:
        w.stop_all()


def _component(world: World, component: str) -> list[LocalPod]:
    return sorted(
        (p for p in world.pods.values() if p.pod.component == component), key=lambda p: p.name
    )


def test_dev_overlay_runs_serves_and_drains(world: World, tmp_path: Path) -> None:
    (etcd,) = _component(world, "etcd")
    (router,) = _component(world, "router")
    nodes = _component(world, "node")
    assert [n.name for n in nodes] == [f"tensorcache-node-{i}" for i in range(3)]

    world.start(etcd)
    wait_ready(etcd)

    # Nodes first: alive ("" SERVING) but not ready while they cannot join.
    for n in nodes:
        world.start(n)
    for n in nodes:
        probe = n.container["startupProbe"]
        poll(lambda n=n, probe=probe: probe_ok(n, probe), timeout=60, what=f"{n.name} alive")
        ready = n.container["readinessProbe"]["grpc"]
        assert health(n.port(ready["port"]), ready["service"]) == NOT_SERVING
    world.start(router)
    wait_ready(router)
    for n in nodes:
        wait_ready(n)

    # A client through the router Service, as a worker would connect.
    router_port = world.service_port("tensorcache-router", 7070)
    capacity = parse_size(flag(nodes[0].argv, "capacity"))
    limit = quantity_bytes(nodes[0].container["resources"]["limits"]["memory"])
    with tensorcache.connect(f"{LOOPBACK}:{router_port}") as client:
        stats = client.stats()
        assert sorted(s.name for s in stats) == [n.name for n in nodes]
        assert all(s.capacity == capacity for s in stats)

        # Fill past the cluster's capacity (evictions included) and measure
        # what the node processes hold against the manifest's memory limit.
        block = np.random.default_rng(0).integers(0, 255, 8 * 1024 * 1024, dtype=np.uint8)
        fill = [f"fill/{i}" for i in range(2 * capacity // block.nbytes)]
        for key in fill:
            client.put(key, block)
        assert all(s.evictions > 0 for s in client.stats()), "every node filled up"
        rss = {n.name: rss_bytes(n.proc.pid) for n in nodes if n.proc is not None}
        for name, used in rss.items():
            assert used <= limit, f"{name}: RSS {used >> 20} MiB > limit {limit >> 20} MiB"
        for key in fill:
            client.delete(key)

        # The keys that must survive the drain: small, medium, and striped.
        want = {f"weights/{i}": sample("float32", (i * 97 + 1,), seed=i) for i in range(40)}
        want["weights/big"] = sample("float16", (6 * 1024 * 1024,), seed=99)  # 12 MiB: striped
        client.put_many(want)
        for key, value in want.items():
            assert_same(client.get(key), value)

        # The example GPU worker's script, from its manifest: the first run
        # loads the weights from disk, the second reads them from the cache.
        model_files = _run_worker_example(world, tmp_path)

        # SIGTERM, as the kubelet sends it; the drain must end in the grace period.
        leaving = nodes[1]
        assert leaving.proc is not None
        grace = leaving.pod.spec["terminationGracePeriodSeconds"]
        ready = leaving.container["readinessProbe"]["grpc"]
        start = time.monotonic()
        leaving.proc.send_signal(signal.SIGTERM)
        seen = []
        while leaving.proc.poll() is None and time.monotonic() - start < grace:
            seen.append(health(leaving.port(ready["port"]), ready["service"]))
            time.sleep(0.05)
        try:
            code = leaving.proc.wait(max(0.0, grace - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{leaving.name} still draining after {grace}s:\n{leaving.log_tail()}")
        took = time.monotonic() - start
        assert code == 0, f"{leaving.name} exited {code}:\n{leaving.log_tail()}"
        # Once readiness said NOT_SERVING it never went back to SERVING.
        if NOT_SERVING in seen:
            assert SERVING not in seen[seen.index(NOT_SERVING) :], seen

        poll(
            lambda: (
                sorted(s.name for s in client.stats() if s.reachable)
                == [nodes[0].name, nodes[2].name]
            ),
            timeout=30,
            what="the ring without the drained node",
        )
        for key, value in want.items():
            assert_same(client.get(key), value)
        for key, value in model_files.items():
            assert_same(client.get(key), value)
    print(
        f"full nodes' RSS {sorted(v >> 20 for v in rss.values())} MiB (limit {limit >> 20} MiB); "
        f"drain of {leaving.name} took {took:.1f}s of its {grace}s grace period"
    )


def _run_worker_example(world: World, tmp: Path) -> dict[str, np.ndarray]:
    """Run k8s/examples/gpu-worker's container twice against the running cluster."""
    (pod,) = [p for p in pods(render(EXAMPLE)) if p.name.endswith("-0")]
    (container,) = pod.containers()
    ports = {p["containerPort"]: free_port() for p in container.get("ports", [])}
    mounts = {m["mountPath"]: tmp / "worker" / m["name"] for m in container["volumeMounts"]}
    for local in mounts.values():
        local.mkdir(parents=True)
    (mounts["/app"] / "worker.py").write_bytes(
        (Path(__file__).resolve().parents[2] / "k8s" / EXAMPLE / "worker.py").read_bytes()
    )
    env = container_env(pod, container, pod_ip=LOOPBACK)
    model_dir = Path(world.localize(LocalPod(pod, container, ports, mounts), env["MODEL_DIR"]))
    model_dir.mkdir(parents=True)
    files = {}
    for i in range(4):
        array = sample("float16", (256, 64 + i), seed=1000 + i)
        np.save(model_dir / f"layer{i}.npy", array)
        files[f"{env['MODEL_PREFIX']}layer{i}.npy"] = array
    world.pods[pod.name] = LocalPod(pod, container, ports, mounts)
    lp = world.pods[pod.name]
    try:
        for loaded in (len(files), 0):  # from disk, then from the cache
            world.start(lp, {"WORKER_EXIT": "1"})
            assert lp.proc is not None
            assert lp.proc.wait(120) == 0, lp.log_tail()
            reports = re.findall(r"worker: (\d+) tensors, (\d+) loaded from", lp.log_tail())
            assert reports and reports[-1] == (str(len(files)), str(loaded)), lp.log_tail()
    finally:
        world.pods.pop(pod.name)
    return files
