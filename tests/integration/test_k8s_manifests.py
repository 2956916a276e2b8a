"""k8s/ checked offline: renders, schemas, cross-references, the image's wheel.

No cluster here, so the manifests are proven by every check that needs none:
each overlay renders with ``kubectl kustomize``; every object passes
``kubernetes-validate --strict`` for the oldest and newest Kubernetes versions
we support; Services, probes, PDBs and NetworkPolicies point at what exists;
every tensorcache command line parses with the CLI's own parser; node memory
covers capacity and the grace period covers the drain. The smoke run of the
same manifests is test_k8s_smoke.py.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tensorcache.apps.cli import build_parser
from tensorcache.sizes import parse_size
from tensorcache.tls import TLSFiles

from .k8s_render import (
    CERT_MANAGER,
    CERT_WORKER,
    DEV,
    EXAMPLE,
    K8S,
    NAMESPACE,
    OVERLAYS,
    PROD,
    ROOT,
    MiB,
    Obj,
    Pod,
    by_kind,
    container_args,
    container_env,
    flag,
    named,
    pods,
    quantity_bytes,
    render,
    selects,
    tensorcache_containers,
)

pytestmark = pytest.mark.integration

# The oldest Kubernetes we support (native gRPC probes are GA since 1.27;
# 1.29 is the oldest still in vendors' extended support) and the newest
# kubernetes-validate knows.
OLDEST_K8S = "1.29"
ALL = (*OVERLAYS, EXAMPLE, CERT_WORKER)
# Seconds a SIGTERM'd node spends outside its drain (node/server.py stop):
# stopping the agent (<= 5), deregistering (<= 2), fetching the ring (<= 5),
# the drain's join slack (1), in-flight RPCs (5), plus margin.
DRAIN_OVERHEAD_S = 20
# memory limit >= capacity x 1.1 + 256 MiB (docs/kubernetes.md, "Sizing").
MEMORY_FACTOR = 1.1
MEMORY_OVERHEAD = 256 * MiB


def _validate_module() -> str:
    try:
        import kubernetes_validate.utils as utils
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI is set but kubernetes-validate is missing (pip install -e '.[dev]')")
        pytest.skip("kubernetes-validate is missing (pip install -e '.[dev]')")
    return str(utils.latest_version())


# ------------------------------------------------------------------ render + schema
@pytest.mark.parametrize("path", ALL)
def test_renders(path: str) -> None:
    objects = render(path)
    assert objects, f"k8s/{path} renders nothing"
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, o["metadata"]


@pytest.mark.parametrize("path", ALL)
def test_every_object_passes_strict_schema_validation(path: str, tmp_path: Path) -> None:
    """``kubernetes-validate --strict`` itself, for the oldest and the newest version.

    Its CLI only warns about a kind it has no schema for; here that fails too.
    """
    newest = _validate_module()
    rendered = tmp_path / "rendered.yaml"
    # Custom resources have no schema in kubernetes-validate (it would only
    # warn); test_monitoring_custom_resources checks them instead.
    core = [o for o in render(path) if (o["apiVersion"], o["kind"]) not in CUSTOM_RESOURCES]
    rendered.write_text(yaml.safe_dump_all(core, sort_keys=False))
    out = subprocess.run(
        [
            *(sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"),
            *("-k", f"{OLDEST_K8S}.0", "-k", f"{newest}.0", str(rendered)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = out.stdout + out.stderr
    assert out.returncode == 0 and not report.strip(), f"k8s/{path}:\n{report}"


# The Prometheus Operator's kinds (k8s/monitoring, in the prod overlay) and
# cert-manager's (the cert-manager overlay; the test_cert_manager_* tests check them).
MONITORING_RESOURCES = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
CUSTOM_RESOURCES = {
    *MONITORING_RESOURCES,
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
}


def test_monitoring_custom_resources() -> None:
    """PodMonitors scrape each node and router pod on its named metrics port;
    the PrometheusRule and the dashboard ConfigMap are k8s/monitoring's files."""
    objects = render(PROD)
    monitors = by_kind(objects, "PodMonitor")
    scraped = set()
    for m in monitors:
        selected = [p for p in pods(objects) if selects(m["spec"]["selector"], p.labels)]
        assert selected, m["metadata"]["name"]
        for pod in selected:
            for endpoint in m["spec"]["podMetricsEndpoints"]:
                assert endpoint["port"] in pod.container_ports(), (pod.name, endpoint)
                assert endpoint["path"] == "/metrics"
            scraped.add(pod.component)
    assert scraped == {"node", "router"}
    rule = named(objects, "PrometheusRule", "tensorcache")
    source = yaml.safe_load((K8S / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule["spec"] == source["spec"]
    dashboard = named(objects, "ConfigMap", "tensorcache-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = (K8S / "monitoring" / "dashboard.json").read_text()
    assert dashboard["data"]["tensorcache.json"] == text
    kinds = {(o["apiVersion"], o["kind"]) for o in objects if "coreos" in o["apiVersion"]}
    assert kinds == MONITORING_RESOURCES


def test_validates_against_more_than_one_version() -> None:
    assert _validate_module() > OLDEST_K8S


# ------------------------------------------------------------------ overlay shapes
def _workload(objects: list[Obj], kind: str, name: str) -> Obj:
    return named(objects, kind, name)


def _replicas(objects: list[Obj], kind: str, name: str) -> int:
    return int(_workload(objects, kind, name)["spec"]["replicas"])


def _router_replicas_setting(objects: list[Obj]) -> int:
    (pod, c) = next((p, c) for p, c in tensorcache_containers(objects) if p.component == "router")
    return int(flag(container_args(pod, c), "replicas"))


def test_dev_shape() -> None:
    objects = render(DEV)
    assert _replicas(objects, "StatefulSet", "tensorcache-etcd") == 1
    assert _replicas(objects, "Deployment", "tensorcache-router") == 1
    assert _replicas(objects, "StatefulSet", "tensorcache-node") == 3
    assert _router_replicas_setting(objects) == 2


def test_prod_shape() -> None:
    objects = render(PROD)
    etcd = _workload(objects, "StatefulSet", "tensorcache-etcd")
    assert etcd["spec"]["replicas"] == 3
    assert _replicas(objects, "Deployment", "tensorcache-router") >= 2
    assert _replicas(objects, "StatefulSet", "tensorcache-node") >= 3
    assert _router_replicas_setting(objects) == 2
    # etcd's initial cluster names exactly its pods, at their stable peer DNS names.
    (pod, c) = next((p, c) for p in pods([etcd]) for c in p.containers())
    members = dict(
        m.split("=", 1)
        for m in container_env(pod, c, pod_ip="-")["ETCD_INITIAL_CLUSTER"].split(",")
    )
    service = etcd["spec"]["serviceName"]
    assert members == {p.name: f"http://{p.name}.{service}:2380" for p in pods([etcd])}, (
        "ETCD_INITIAL_CLUSTER must list every member"
    )
    pdb = named(objects, "PodDisruptionBudget", "tensorcache-etcd")
    assert pdb["spec"]["minAvailable"] == 2, "etcd keeps a quorum of 3 through disruptions"


@pytest.mark.parametrize("path", OVERLAYS)
def test_nodes_are_a_parallel_statefulset_named_by_pod(path: str) -> None:
    objects = render(path)
    sts = _workload(objects, "StatefulSet", "tensorcache-node")
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    headless = named(objects, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    spread = sts["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname" and t["whenUnsatisfiable"] == "DoNotSchedule"
        for t in spread
    ), "nodes must spread over hosts"
    for pod in pods([sts]):
        (c,) = pod.containers()
        args = container_args(pod, c, pod_ip="10.1.2.3")
        assert flag(args, "name") == pod.name, "the ring hashes on the stable pod name"
        # Clients dial the pod IP; with cert-manager, the per-pod DNS name under
        # the headless Service, which the node's certificate names.
        dns = f"{pod.name}.{sts['spec']['serviceName']}.{NAMESPACE}.svc.cluster.local"
        assert flag(args, "advertise") == (dns if path == CERT_MANAGER else "10.1.2.3")
        assert flag(args, "router") == "tensorcache-router:7070"
    pdb = named(objects, "PodDisruptionBudget", "tensorcache-node")
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("path", OVERLAYS)
def test_routers_use_etcd_and_advertise_their_pod_ip(path: str) -> None:
    objects = render(path)
    for pod, c in tensorcache_containers(objects):
        if pod.component != "router":
            continue
        args = container_args(pod, c, pod_ip="10.9.8.7")
        assert flag(args, "advertise") == "10.9.8.7"
        # https, with the routers' etcd client certificate, where etcd has TLS.
        scheme = "https" if path == CERT_MANAGER else "http"
        m = re.fullmatch(rf"{scheme}://([a-z0-9-]+):(\d+)", flag(args, "etcd"))
        assert m, flag(args, "etcd")
        service = named(objects, "Service", m.group(1))
        assert int(m.group(2)) in [p["port"] for p in service["spec"]["ports"]]
        assert any(selects(service["spec"]["selector"], p.labels) for p in pods(objects))


# ------------------------------------------------------------------ cross-references
@pytest.mark.parametrize("path", OVERLAYS)
def test_service_selectors_and_ports_match_pods(path: str) -> None:
    objects = render(path)
    for svc in by_kind(objects, "Service"):
        name = svc["metadata"]["name"]
        matched = [p for p in pods(objects) if selects(svc["spec"]["selector"], p.labels)]
        assert matched, f"Service {name} selects no pod"
        kinds = {p.workload["metadata"]["name"] for p in matched}
        assert len(kinds) == 1, f"Service {name} selects pods of {kinds}"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for p in matched:
                assert target in p.container_ports(), f"{name}:{port} -> {p.name}"
    for sts in by_kind(objects, "StatefulSet"):
        svc = named(objects, "Service", sts["spec"]["serviceName"])
        assert svc["spec"]["clusterIP"] == "None", "a StatefulSet's service is headless"
        assert selects(svc["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])


def _probes(c: Obj) -> Iterator[tuple[str, Obj]]:
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        if kind in c:
            yield kind, c[kind]


@pytest.mark.parametrize("path", ALL)
def test_probe_ports_are_container_ports(path: str) -> None:
    objects = render(path)
    for pod in pods(objects):
        for c in pod.containers():
            ports = {p["containerPort"] for p in c.get("ports", [])} | {
                p["name"] for p in c.get("ports", [])
            }
            for kind, probe in _probes(c):
                (action,) = [k for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in probe]
                if action != "exec":
                    assert probe[action]["port"] in ports, f"{pod.name} {kind}: {probe}"


@pytest.mark.parametrize("path", OVERLAYS)
def test_tensorcache_ports_and_probes_match_their_flags(path: str) -> None:
    """--port, --data-port and --health-port are the declared container ports, and
    every probe is a native gRPC probe on the plaintext health port."""
    objects = render(path)
    seen = set()
    for pod, c in tensorcache_containers(objects):
        args = container_args(pod, c)
        named_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert int(flag(args, "port")) == named_ports["grpc"]
        assert int(flag(args, "health-port")) == named_ports["health"]
        if pod.component == "node":
            assert int(flag(args, "data-port")) == named_ports["data"]
        assert int(flag(args, "metrics-port")) == named_ports["metrics"]
        expected = {
            "node": {"grpc", "data", "health", "metrics"},
            "router": {"grpc", "health", "metrics"},
        }
        assert set(named_ports) == expected[pod.component]
        probes = dict(_probes(c))
        assert set(probes) == {"startupProbe", "livenessProbe", "readinessProbe"}
        for probe in probes.values():
            assert probe["grpc"]["port"] == named_ports["health"]
        assert probes["livenessProbe"]["grpc"]["service"] == ""
        ready = probes["readinessProbe"]["grpc"]["service"]
        # Nodes: ready only while in the ring (node/server.py); routers: while running.
        assert ready == {"node": "tensorcache.v1.Node", "router": ""}[pod.component]
        seen.add(pod.component)
    assert seen == {"node", "router"}


@pytest.mark.parametrize("path", OVERLAYS)
def test_pdbs_select_existing_pods(path: str) -> None:
    objects = render(path)
    for pdb in by_kind(objects, "PodDisruptionBudget"):
        matched = {
            p.workload["metadata"]["name"]
            for p in pods(objects)
            if selects(pdb["spec"]["selector"], p.labels)
        }
        assert len(matched) == 1, f"PDB {pdb['metadata']['name']} selects {matched}"
    names = {p["metadata"]["name"] for p in by_kind(objects, "PodDisruptionBudget")}
    assert {"tensorcache-node", "tensorcache-router"} <= names


@pytest.mark.parametrize("path", OVERLAYS)
def test_every_container_argument_parses_with_the_cli(path: str) -> None:
    objects = render(path)
    count = 0
    for pod, c in tensorcache_containers(objects):
        args = container_args(pod, c)
        assert not [a for a in args if "$(" in a], f"unexpanded variable in {args}"
        parsed = build_parser().parse_args(args)  # exits (SystemExit) on a bad flag
        assert parsed.command == {"node": "node", "router": "router"}[pod.component]
        if parsed.command == "node":
            assert parse_size(parsed.capacity) > 0
            assert parsed.no_local_readers
        else:
            assert parsed.replicas >= 1
        count += 1
    assert count >= 2


@pytest.mark.parametrize("path", OVERLAYS)
def test_node_memory_covers_capacity(path: str) -> None:
    objects = render(path)
    for pod, c in tensorcache_containers(objects):
        if pod.component != "node":
            continue
        capacity = parse_size(flag(container_args(pod, c), "capacity"))
        resources = c["resources"]
        limit = quantity_bytes(resources["limits"]["memory"])
        request = quantity_bytes(resources["requests"]["memory"])
        assert request == limit, "Guaranteed QoS: memory request = limit"
        assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
        need = capacity * MEMORY_FACTOR + MEMORY_OVERHEAD
        assert limit >= need, (
            f"{pod.name}: memory limit {limit / MiB:.0f} MiB < capacity "
            f"{capacity / MiB:.0f} MiB x {MEMORY_FACTOR} + 256 MiB = {need / MiB:.0f} MiB"
        )


@pytest.mark.parametrize("path", OVERLAYS)
def test_grace_period_covers_the_drain(path: str) -> None:
    objects = render(path)
    for pod, c in tensorcache_containers(objects):
        if pod.component != "node":
            continue
        drain = float(flag(container_args(pod, c), "drain-timeout"))
        grace = pod.spec["terminationGracePeriodSeconds"]
        assert drain > 0, "a node must hand its entries over on SIGTERM"
        assert grace >= drain + DRAIN_OVERHEAD_S, (
            f"{pod.name}: grace {grace}s < drain {drain}s + {DRAIN_OVERHEAD_S}s"
        )


@pytest.mark.parametrize("path", ALL)
def test_restricted_security_and_resources(path: str) -> None:
    objects = render(path)
    checked = 0
    for pod in pods(objects):
        spec = pod.spec
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        for host in ("hostPID", "hostIPC", "hostNetwork"):
            assert not spec.get(host), f"{pod.name}: {host}"
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["runAsNonRoot"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert not sc.get("privileged")
            assert {"cpu", "memory"} <= set(c["resources"]["requests"])
            assert "memory" in c["resources"]["limits"]
            checked += 1
    assert checked
    for ns in by_kind(objects, "Namespace"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("path", ALL)
def test_recommended_labels(path: str) -> None:
    objects = render(path)
    for o in objects:
        labels = o["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/managed-by") == "kustomize", o["metadata"]
        assert labels.get("app.kubernetes.io/part-of"), o["metadata"]
        if o["kind"] in ("StatefulSet", "Deployment", "Service", "PodDisruptionBudget"):
            assert {"app.kubernetes.io/name", "app.kubernetes.io/component"} <= set(labels)
    for pod in pods(objects):
        assert {
            "app.kubernetes.io/name",
            "app.kubernetes.io/component",
            "app.kubernetes.io/part-of",
        } <= set(pod.labels)


# ------------------------------------------------------------------ network policy
@dataclass(frozen=True)
class Peer:
    """A pod for the NetworkPolicy evaluation: who it is, where, and its ports."""

    role: str
    namespace: str
    labels: tuple[tuple[str, str], ...]
    ports: tuple[tuple[int, str], ...]  # (port, protocol)
    named: tuple[tuple[str, int], ...] = ()

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def _peer_from(pod: Pod, role: str) -> Peer:
    ports = [
        (p["containerPort"], p.get("protocol", "TCP"))
        for c in pod.containers()
        for p in c.get("ports", [])
    ]
    names = [(n, v) for n, v in pod.container_ports().items() if isinstance(n, str)]
    return Peer(role, pod.namespace, tuple(sorted(pod.labels.items())), tuple(ports), tuple(names))


def _ns_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}


def _peer_matches(rule_peer: Obj, policy_ns: str, pod: Peer) -> bool:
    assert "ipBlock" not in rule_peer, "policies admit pods, never address blocks"
    if "namespaceSelector" in rule_peer:
        if not selects(rule_peer["namespaceSelector"] or {}, _ns_labels(pod.namespace)):
            return False
    elif pod.namespace != policy_ns:
        return False
    return selects(rule_peer.get("podSelector") or {}, pod.label_map)


def _port_matches(rule: Obj, target: Peer, port: int, proto: str) -> bool:
    if not rule.get("ports"):
        return True
    for p in rule["ports"]:
        number = p.get("port")
        if isinstance(number, str):
            number = dict(target.named).get(number)
        if p.get("protocol", "TCP") == proto and (
            number is None or number <= port <= p.get("endPort", number)
        ):
            return True
    return False


def _allowed(policies: list[Obj], src: Peer, dst: Peer, port: int, proto: str) -> bool:
    def side(owner: Peer, direction: str, other: Peer, key: str) -> bool:
        applying = [
            p
            for p in policies
            if p["metadata"]["namespace"] == owner.namespace
            and selects(p["spec"]["podSelector"] or {}, owner.label_map)
            and direction in p["spec"].get("policyTypes", ["Ingress"])
        ]
        if not applying:
            return True  # not isolated in that direction
        return any(
            (
                not rule.get(key)
                or any(_peer_matches(r, p["metadata"]["namespace"], other) for r in rule[key])
            )
            and _port_matches(rule, dst, port, proto)
            for p in applying
            for rule in p["spec"].get(direction.lower(), [])
        )

    return side(dst, "Ingress", src, "from") and side(src, "Egress", dst, "to")


# Exactly these paths, and nothing else, to or from a tensorcache pod.
CLIENT = ("worker", "worker-elsewhere")
REQUIRED_PATHS = {
    *((w, "router", 7070, "TCP") for w in CLIENT),
    *((w, "node", port, "TCP") for w in CLIENT for port in (7071, 7072)),
    ("node", "router", 7070, "TCP"),
    ("node", "node", 7071, "TCP"),
    ("router", "router", 7070, "TCP"),
    ("router", "etcd", 2379, "TCP"),
    ("etcd", "etcd", 2380, "TCP"),
    *((c, "dns", 53, proto) for c in ("node", "router", "etcd") for proto in ("UDP", "TCP")),
    ("prometheus", "node", 9090, "TCP"),
    ("prometheus", "router", 9090, "TCP"),
}


@pytest.mark.parametrize("path", OVERLAYS)
def test_network_policy_admits_exactly_the_required_paths(path: str) -> None:
    objects = render(path)
    policies = by_kind(objects, "NetworkPolicy")
    ours: list[Peer] = []
    for pod in pods(objects):
        peer = _peer_from(pod, pod.component)
        ours += [peer, peer]  # two of each: pod-to-pod paths within a component
    worker_pod = next(pods(render(EXAMPLE)))
    worker = _peer_from(worker_pod, "worker")
    elsewhere = Peer("worker-elsewhere", "ml", worker.labels, worker.ports)
    others = [
        worker,
        elsewhere,
        Peer("dns", "kube-system", (("k8s-app", "kube-dns"),), ((53, "UDP"), (53, "TCP"))),
        # The Prometheus Operator's server, scraping /metrics.
        Peer("prometheus", "monitoring", (("app.kubernetes.io/name", "prometheus"),), ()),
        # An unlabelled pod next to ours, and one copying our names from elsewhere.
        Peer("stranger", NAMESPACE, (("app", "other"),), ((8080, "TCP"),)),
        Peer("impostor", "other", next(p for p in ours if p.role == "node").labels, ()),
    ]
    everyone = ours + others
    allowed = set()
    for (i, src), (j, dst) in itertools.product(enumerate(everyone), repeat=2):
        if i == j or (src not in ours and dst not in ours):
            continue
        for port, proto in dst.ports:
            if _allowed(policies, src, dst, port, proto):
                allowed.add((src.role, dst.role, port, proto))
    assert allowed == REQUIRED_PATHS, (
        f"admitted but not required: {sorted(allowed - REQUIRED_PATHS)}; "
        f"required but not admitted: {sorted(REQUIRED_PATHS - allowed)}"
    )


# ------------------------------------------------------------------ the GPU worker example
def test_gpu_worker_example_reaches_the_router_service() -> None:
    (pod,) = [p for p in pods(render(EXAMPLE)) if p.name.endswith("-0")]
    (c,) = pod.containers()
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    env = container_env(pod, c, pod_ip="-")
    host, port = env["TC_ROUTER"].rsplit(":", 1)
    service, namespace = host.split(".", 1)
    assert namespace == NAMESPACE
    for overlay in OVERLAYS:
        svc = named(render(overlay), "Service", service)
        assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    assert pod.labels["tensorcache.io/client"] == "true"
    source = (K8S / EXAMPLE / "worker.py").read_text()
    compile(source, "worker.py", "exec")
    (cm,) = by_kind(render(EXAMPLE), "ConfigMap")
    assert cm["data"]["worker.py"] == source


# ------------------------------------------------------------------ cert-manager (mutual TLS)
TLS_ENV = ("TENSORCACHE_TLS_CERT", "TENSORCACHE_TLS_KEY", "TENSORCACHE_TLS_CA")
# The Secret each component's certificate lands in.
CERT_SECRETS = {
    "node": "tensorcache-node-tls",
    "router": "tensorcache-router-tls",
    "worker": "tensorcache-worker-tls",
}
# etcd's: its members' (server, and client towards peers) and the routers' client one.
ETCD_SECRETS = {"member": "tensorcache-etcd-tls", "client": "tensorcache-etcd-client-tls"}


def _dns_matches(pattern: str, name: str) -> bool:
    """RFC 6125 matching: a leading ``*`` stands for exactly one whole label."""
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def _certificates() -> dict[str, Obj]:
    return {c["spec"]["secretName"]: c for c in by_kind(render(CERT_MANAGER), "Certificate")}


def _ca_issuers() -> dict[str, str]:
    """CA Issuer name -> the Secret of the CA Certificate it signs with."""
    issuers = {i["metadata"]["name"]: i["spec"] for i in by_kind(render(CERT_MANAGER), "Issuer")}
    return {n: i["ca"]["secretName"] for n, i in issuers.items() if "ca" in i}


def test_cert_manager_issues_from_two_cas() -> None:
    """Self-signed bootstrap Issuer -> two CA Certificates -> their CA Issuers:
    the cluster's CA signs the nodes', routers' and workers' leaves, etcd's
    own CA only etcd's members' and the routers' etcd client certificate
    (etcd admits whatever its CA signed: etcd-certificates.yaml)."""
    objects = render(CERT_MANAGER)
    issuers = {i["metadata"]["name"]: i["spec"] for i in by_kind(objects, "Issuer")}
    certs = _certificates()
    cas = {name: c for name, c in certs.items() if c["spec"].get("isCA")}
    assert set(cas) == {"tensorcache-ca", "tensorcache-etcd-ca"}
    for ca in cas.values():
        assert "selfSigned" in issuers[ca["spec"]["issuerRef"]["name"]]
    ca_issuers = _ca_issuers()
    assert sorted(ca_issuers.values()) == sorted(cas)
    # Both CAs keep their keys on renewal: etcd loads --trusted-ca-file once,
    # and a new cluster CA key would split processes that had not reloaded.
    for ca in cas.values():
        assert ca["spec"]["privateKey"]["rotationPolicy"] == "Never"
    leaves = {name: c for name, c in certs.items() if not c["spec"].get("isCA")}
    assert set(leaves) == {*CERT_SECRETS.values(), *ETCD_SECRETS.values()}
    for name, cert in leaves.items():
        spec = cert["spec"]
        signer = "tensorcache-etcd-ca" if name in ETCD_SECRETS.values() else "tensorcache-ca"
        assert spec["issuerRef"]["kind"] == "Issuer"
        assert spec["issuerRef"]["group"] == "cert-manager.io"
        assert ca_issuers[spec["issuerRef"]["name"]] == signer, name
        # Nodes, routers and etcd members serve and call; workers and the
        # routers' etcd client certificate only call.
        only_calls = "worker" in name or name == ETCD_SECRETS["client"]
        need = {"client auth"} | ({"server auth"} if not only_calls else set())
        assert need <= set(spec["usages"]), name
        assert spec["privateKey"]["rotationPolicy"] == "Always"
        assert spec["renewBefore"] and spec["duration"]


@pytest.mark.parametrize("path", [CERT_MANAGER, CERT_WORKER])
def test_cert_manager_every_grpc_container_mounts_cert_key_and_ca(path: str) -> None:
    """Every container that speaks tensorcache's gRPC (nodes, routers, workers)
    names its certificate, key and CA in TENSORCACHE_TLS_*, and they are the
    files of its component's Secret, mounted whole (renewals reach them) and
    readable by the pod's user. etcd is not tensorcache's gRPC: its TLS is
    test_cert_manager_etcd_* below."""
    checked = set()
    for pod in pods(render(path)):
        if pod.component == "etcd":
            continue
        (c,) = pod.containers()
        env = container_env(pod, c, pod_ip="10.0.0.7")
        files = TLSFiles.from_env(env)
        assert files is not None, f"{pod.name}: no TENSORCACHE_TLS_*"
        volumes = {v["name"]: v for v in pod.spec["volumes"]}
        for var, path_ in zip(TLS_ENV, (files.cert, files.key, files.ca), strict=True):
            (mount,) = [
                m for m in c["volumeMounts"] if path_.startswith(m["mountPath"].rstrip("/") + "/")
            ]
            assert mount.get("readOnly") is True and "subPath" not in mount, (pod.name, mount)
            secret = volumes[mount["name"]]["secret"]
            assert secret["secretName"] == CERT_SECRETS[pod.component], (pod.name, var)
            assert path_.rsplit("/", 1)[1] in ("tls.crt", "tls.key", "ca.crt")
            mode = secret.get("defaultMode", 0o644)
            group = pod.spec["securityContext"].get("fsGroup")
            assert mode & 0o004 or (mode & 0o040 and group is not None), (pod.name, oct(mode))
        checked.add(pod.component)
    expected = {"node", "router"} if path == CERT_MANAGER else {"worker"}
    assert checked == expected


def test_cert_manager_certificates_name_the_addresses_dialled() -> None:
    """Clients check a server's certificate against the address they dial:
    each node's advertised per-pod name under the headless Service, the
    router Service's names (as nodes and workers write them), and the name
    routers check each other for (--tls-peer-name)."""
    objects = render(CERT_MANAGER)
    certs = _certificates()
    node_names = certs[CERT_SECRETS["node"]]["spec"]["dnsNames"]
    router_names = certs[CERT_SECRETS["router"]]["spec"]["dnsNames"]
    sts = named(objects, "StatefulSet", "tensorcache-node")
    headless = sts["spec"]["serviceName"]
    dialled = {"router": set(), "peer": set()}
    for pod, c in tensorcache_containers(objects):
        args = container_args(pod, c)
        if pod.component == "node":
            advertised = flag(args, "advertise")
            assert advertised.startswith(f"{pod.name}.{headless}.{NAMESPACE}.svc")
            assert any(_dns_matches(n, advertised) for n in node_names), advertised
            # The short forms too (operators and tools in the namespace).
            for short in (f"{pod.name}.{headless}", f"{pod.name}.{headless}.{NAMESPACE}"):
                assert any(_dns_matches(n, short) for n in node_names), short
            dialled["router"].add(flag(args, "router").rsplit(":", 1)[0])
        else:
            dialled["peer"].add(flag(args, "tls-peer-name"))
    worker = next(p for p in pods(render(CERT_WORKER)))
    (wc,) = worker.containers()
    dialled["router"].add(container_env(worker, wc, pod_ip="-")["TC_ROUTER"].rsplit(":", 1)[0])
    for host in dialled["router"] | dialled["peer"]:
        assert host in router_names, f"{host} is not in the router certificate {router_names}"
    assert dialled["router"] and dialled["peer"]


def test_cert_manager_leaves_data_channel_encryption_on() -> None:
    """On by default with TLS; the overlay says how to turn it off, and does not."""
    for pod, c in tensorcache_containers(render(CERT_MANAGER)):
        env = container_env(pod, c, pod_ip="10.0.0.7")
        assert "TENSORCACHE_DATA_CHANNEL_ENCRYPTION" not in env
        parsed = build_parser().parse_args(container_args(pod, c))
        if pod.component == "node":
            assert parsed.data_channel_encryption is None
    text = (K8S / CERT_MANAGER / "tls.yaml").read_text()
    assert "# - name: TENSORCACHE_DATA_CHANNEL_ENCRYPTION" in text


def _secret_file(pod: Pod, container: Obj, path: str) -> tuple[str, str]:
    """(Secret name, key) of a file the container reads, checking the mount:
    read-only, the whole Secret (renewals reach it), readable by the pod's group."""
    (mount,) = [
        m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mount.get("readOnly") is True and "subPath" not in mount, (pod.name, mount)
    (volume,) = [v for v in pod.spec["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    mode = secret.get("defaultMode", 0o644)
    group = pod.spec["securityContext"].get("fsGroup")
    assert mode & 0o004 or (mode & 0o040 and group is not None), (pod.name, oct(mode))
    return secret["secretName"], path.removeprefix(mount["mountPath"].rstrip("/") + "/")


def _etcd_args(objects: list[Obj]) -> Iterator[tuple[Pod, Obj, list[str], dict[str, str]]]:
    for pod in pods(objects):
        if pod.component == "etcd":
            (c,) = pod.containers()
            yield pod, c, container_args(pod, c), container_env(pod, c, pod_ip="10.4.4.4")


def test_cert_manager_etcd_serves_clients_and_peers_over_mutual_tls() -> None:
    """Every etcd member: https client and peer URLs (listened, advertised, in
    the initial cluster), client certificates required on both, its
    certificate, key and CA from etcd's Secret; peers only with the members'
    common name. Probes stay off the TLS ports: the metrics listener is
    plaintext (/health, /metrics) and every probe uses it."""
    objects = render(CERT_MANAGER)
    certs = _certificates()
    member_cn = certs[ETCD_SECRETS["member"]]["spec"]["commonName"]
    checked = 0
    for pod, c, args, env in _etcd_args(objects):
        for name in ("listen-client-urls", "advertise-client-urls"):
            assert flag(args, name).startswith("https://"), (pod.name, name)
        for name in ("listen-peer-urls", "initial-advertise-peer-urls"):
            assert flag(args, name).startswith("https://"), (pod.name, name)
        initial = dict(m.split("=", 1) for m in env["ETCD_INITIAL_CLUSTER"].split(","))
        assert initial[pod.name] == flag(args, "initial-advertise-peer-urls")
        assert all(u.startswith("https://") for u in initial.values()), initial
        assert "--client-cert-auth" in args and "--peer-client-cert-auth" in args
        assert flag(args, "peer-cert-allowed-cn") == member_cn
        files = {
            name: _secret_file(pod, c, flag(args, name))
            for name in (
                "cert-file",
                "key-file",
                "trusted-ca-file",
                "peer-cert-file",
                "peer-key-file",
                "peer-trusted-ca-file",
            )
        }
        assert {secret for secret, _ in files.values()} == {ETCD_SECRETS["member"]}
        assert files["cert-file"][1] == files["peer-cert-file"][1] == "tls.crt"
        assert files["key-file"][1] == files["peer-key-file"][1] == "tls.key"
        assert files["trusted-ca-file"][1] == files["peer-trusted-ca-file"][1] == "ca.crt"
        metrics = flag(args, "listen-metrics-urls")
        assert metrics.startswith("http://"), metrics
        metrics_port = int(metrics.rsplit(":", 1)[1])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            (kind,) = [k for k in ("tcpSocket", "httpGet", "grpc", "exec") if k in c[probe]]
            port = c[probe][kind]["port"]
            assert pod.container_ports()[port] == metrics_port, (pod.name, probe)
            assert c[probe][kind].get("scheme", "HTTP") == "HTTP", (pod.name, probe)
        checked += 1
    assert checked == 3


def test_cert_manager_routers_dial_etcd_with_its_client_certificate() -> None:
    """Routers: an https --etcd URL whose host etcd's certificate names, and
    --etcd-cert/-key/-ca from the routers' etcd client Secret, which etcd's
    CA signs (the CA etcd trusts, the CA routers check etcd against)."""
    objects = render(CERT_MANAGER)
    certs = _certificates()
    member_names = certs[ETCD_SECRETS["member"]]["spec"]["dnsNames"]
    client = certs[ETCD_SECRETS["client"]]["spec"]
    assert client["issuerRef"]["name"] == certs[ETCD_SECRETS["member"]]["spec"]["issuerRef"]["name"]
    checked = 0
    for pod, c in tensorcache_containers(objects):
        if pod.component != "router":
            continue
        args = container_args(pod, c)
        parsed = build_parser().parse_args(args)
        host = re.fullmatch(r"https://([a-z0-9.-]+):\d+", parsed.etcd)
        assert host, parsed.etcd
        assert any(_dns_matches(n, host.group(1)) for n in member_names), host.group(1)
        files = {
            "cert": _secret_file(pod, c, parsed.etcd_cert),
            "key": _secret_file(pod, c, parsed.etcd_key),
            "ca": _secret_file(pod, c, parsed.etcd_ca),
        }
        assert files == {
            "cert": (ETCD_SECRETS["client"], "tls.crt"),
            "key": (ETCD_SECRETS["client"], "tls.key"),
            "ca": (ETCD_SECRETS["client"], "ca.crt"),
        }
        assert parsed.etcd_user is None  # client certificates, no etcd users
        checked += 1
    assert checked == 2


def test_cert_manager_etcd_certificate_names_every_member_address() -> None:
    """A member dials its peers at their advertised peer URLs and checks their
    certificates against those names; etcd checks an incoming peer's client
    certificate against the peer's address by resolving the certificate's
    names, so each member's full name is listed, not only a wildcard."""
    objects = render(CERT_MANAGER)
    names = _certificates()[ETCD_SECRETS["member"]]["spec"]["dnsNames"]
    sts = named(objects, "StatefulSet", "tensorcache-etcd")
    checked = 0
    for pod, _c, args, _env in _etcd_args(objects):
        for url in (flag(args, "advertise-client-urls"), flag(args, "initial-advertise-peer-urls")):
            host = re.fullmatch(r"https://([a-z0-9.-]+):\d+", url)
            assert host, url
            assert any(_dns_matches(n, host.group(1)) for n in names), host.group(1)
        full = f"{pod.name}.{sts['spec']['serviceName']}.{NAMESPACE}.svc.cluster.local"
        assert full in names, full
        checked += 1
    assert checked == sts["spec"]["replicas"] == 3


# ------------------------------------------------------------------ the image
def _dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), split into stages."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    stages: list[list[str]] = []
    for ln in lines:
        if ln.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(ln)
    return stages


def test_dockerfile_shape() -> None:
    build, final = _dockerfile_stages()
    assert any("pip wheel" in ln for ln in build), "the build stage builds wheels"
    assert not any(ln.startswith("COPY") and "--from" not in ln for ln in final), (
        "the final stage takes nothing from the source tree"
    )
    assert not any(re.search(r"apt-get|gcc|build-essential|pip install", ln) for ln in final)
    (user,) = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert int(user.split(":")[0]) > 0
    assert 'ENTRYPOINT ["tensorcache"]' in final
    # Every pod runs as the image's user.
    for path in OVERLAYS:
        for pod, _c in tensorcache_containers(render(path)):
            assert pod.spec["securityContext"]["runAsUser"] == int(user.split(":")[0])


def test_wheel_the_image_installs_builds_and_runs(tmp_path: Path) -> None:
    """Build the wheel from exactly what the Dockerfile copies, install it into a
    fresh virtualenv, and run the entrypoint's commands from there.

    Offline: the wheel is built without build isolation and installed without
    dependencies; the dependencies come from this interpreter's site-packages,
    added as a plain path (its editable tensorcache is not activated).
    """
    build, _final = _dockerfile_stages()
    context = tmp_path / "context"
    context.mkdir()
    copied = []
    for ln in build:
        if ln.startswith("COPY ") and "--from" not in ln:
            *sources, _dest = ln.split()[1:]
            for src in sources:
                src = src.rstrip("/")
                copied.append(src)
                path = ROOT / src
                if path.is_dir():
                    shutil.copytree(
                        path, context / src, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy2(path, context / src)
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for src in copied:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f".dockerignore drops {src}"

    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--wheel-dir", str(wheels), str(context)),
        ],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("tensorcache-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"),
            *("--no-deps", "--no-index", str(wheel)),
        ],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    # Dependencies from this interpreter's site-packages, as a plain path: its
    # .pth files (the editable tensorcache) are not processed from there.
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "zz-deps.pth").write_text(deps + "\n")
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}

    def run(*argv: str) -> str:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=clean, check=False
        )
        assert out.returncode == 0, f"{argv}: {out.stderr}"
        return out.stdout

    imports = (
        "import tensorcache, tensorcache.node.server, tensorcache.proto.tensorcache_pb2 as p; "
        "print(tensorcache.__file__, p.__file__)"
    )
    where = run(str(python), "-c", imports)
    assert all(w.startswith(str(site)) for w in where.split()), f"not from the wheel: {where}"
    entrypoint = str(env_dir / "bin" / "tensorcache")
    for command in ("node", "router"):
        text = run(entrypoint, command, "--help")
        assert "--health-port" in text and "--port" in text, text
    assert "node" in run(entrypoint, "--help")
