"""The Kubernetes manifests under k8s/, rendered and read the way a cluster would.

``render(overlay)`` runs ``kubectl kustomize``; the rest reads the objects:
pods each workload makes (``pods``), a container's environment with the
downward-API values a pod gets (``container_env``), Kubernetes' ``$(VAR)``
expansion (``expand``), label selectors, and resource quantities. Shared by
test_k8s_manifests.py (static checks) and test_k8s_smoke.py (running the
manifests' command lines as local processes).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:  # PyYAML comes with kubernetes-validate (the dev extra)
    import yaml
except ImportError:  # pragma: no cover - reported by _render
    yaml = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DEV = "overlays/dev"
PROD = "overlays/prod"
# prod + mutual TLS by cert-manager, and the GPU worker example with its certificate.
CERT_MANAGER = "overlays/cert-manager"
OVERLAYS = (DEV, PROD, CERT_MANAGER)
EXAMPLE = "examples/gpu-worker"
CERT_WORKER = "overlays/cert-manager/worker"
NAMESPACE = "tensorcache"
WORKLOADS = ("StatefulSet", "Deployment")
MiB = 1024**2

Obj = dict[str, Any]


def _required(what: str, found: str | None) -> str:
    """A tool the tests need: missing fails under CI (CI=true), else skips."""
    if found:
        return found
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI is set but {what} is missing: the Kubernetes manifest tests must run")
    pytest.skip(f"{what} is missing (install it to check k8s/)")


def kubectl() -> str:
    """kubectl with its built-in kustomize."""
    return _required("kubectl", shutil.which("kubectl") or _existing("/usr/bin/kubectl"))


def _existing(path: str) -> str | None:
    return path if Path(path).is_file() else None


@functools.cache
def _render(path: str) -> tuple[Obj, ...]:
    if yaml is None:
        _required("PyYAML (pip install -e '.[dev]')", None)
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if out.returncode != 0:
        pytest.fail(f"kubectl kustomize k8s/{path} failed:\n{out.stderr}")
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(path: str) -> list[Obj]:
    """The objects ``kubectl kustomize k8s/<path>`` renders (a fresh copy)."""
    return copy.deepcopy(list(_render(path)))


def render_text(path: str) -> str:
    return yaml.safe_dump_all(list(_render(path)))


def by_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


# ------------------------------------------------------------------ pods
@dataclass(frozen=True)
class Pod:
    """One pod a workload makes: its name, labels and spec."""

    name: str
    workload: Obj
    namespace: str

    @property
    def spec(self) -> Obj:
        return self.workload["spec"]["template"]["spec"]  # type: ignore[no-any-return]

    @property
    def labels(self) -> dict[str, str]:
        return self.workload["spec"]["template"]["metadata"]["labels"]  # type: ignore[no-any-return]

    @property
    def component(self) -> str:
        return self.labels["app.kubernetes.io/component"]

    def containers(self) -> list[Obj]:
        return self.spec["containers"]  # type: ignore[no-any-return]

    def container_ports(self) -> dict[str | int, int]:
        """Every container port by number and by name -> number."""
        ports: dict[str | int, int] = {}
        for c in self.containers():
            for p in c.get("ports", []):
                ports[p["containerPort"]] = p["containerPort"]
                if "name" in p:
                    ports[p["name"]] = p["containerPort"]
        return ports


def pods(objects: list[Obj]) -> Iterator[Pod]:
    """The pods of every StatefulSet and Deployment, named as Kubernetes names them
    (StatefulSet: ``<name>-<ordinal>``; Deployment: ``<name>-<n>`` standing in
    for the generated suffix)."""
    for w in objects:
        if w["kind"] not in WORKLOADS:
            continue
        ns = w["metadata"].get("namespace", "default")
        for i in range(w["spec"].get("replicas", 1)):
            yield Pod(f"{w['metadata']['name']}-{i}", w, ns)


def tensorcache_containers(objects: list[Obj]) -> Iterator[tuple[Pod, Obj]]:
    """(pod, container) for every container that runs the ``tensorcache`` command."""
    for pod in pods(objects):
        for c in pod.containers():
            if c.get("command", [""])[0] == "tensorcache":
                yield pod, c


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels / matchExpressions, or a Service's plain map)."""
    if selector is None:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


# ------------------------------------------------------------------ env and args
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` is ``$``,
    anything else is left as written."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(one, text)


def container_env(pod: Pod, container: Obj, *, pod_ip: str) -> dict[str, str]:
    """The container's env as the kubelet would set it (downward API resolved)."""
    fields = {
        "metadata.name": pod.name,
        "metadata.namespace": pod.namespace,
        "status.podIP": pod_ip,
    }
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        else:
            ref = e["valueFrom"]["fieldRef"]["fieldPath"]
            assert ref in fields, f"{pod.name}: env {e['name']} uses unknown field {ref}"
            env[e["name"]] = fields[ref]
    return env


def container_args(pod: Pod, container: Obj, *, pod_ip: str = "10.0.0.7") -> list[str]:
    """The container's command arguments (after the command) with ``$(VAR)`` expanded."""
    env = container_env(pod, container, pod_ip=pod_ip)
    return [expand(a, env) for a in container["command"][1:] + container.get("args", [])]


def flag(args: list[str], name: str) -> str:
    """The value of ``--name=value`` in ``args`` (the manifests' one style)."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"expected one --{name}=... in {args}"
    return values[0]


# ------------------------------------------------------------------ quantities
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)([A-Za-z]*)$")
_SUFFIX = {
    "": 1,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}


def quantity_bytes(text: str | int) -> int:
    """A Kubernetes memory quantity (``640Mi``, ``54Gi``, ``1G``, ``1048576``) in bytes."""
    m = _QUANTITY.match(str(text))
    assert m and m.group(2) in _SUFFIX, f"not a memory quantity: {text!r}"
    return int(float(m.group(1)) * _SUFFIX[m.group(2)])
