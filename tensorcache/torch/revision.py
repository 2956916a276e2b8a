"""A model revision in the cluster: tensors under a prefix, committed by a manifest.

Layout of revision ``prefix`` (which ends with "/"):

    <prefix>t/<tensor name>   each tensor, put as it comes
    <prefix>manifest          JSON (as a uint8 tensor): every tensor's name,
                              dtype, shape and size; written LAST

The manifest is the commit point, as a striped tensor's manifest is for its
stripes (docs/architecture.md): readers look for it first and see nothing
until it exists, so a writer killed half way leaves an invisible, partial
revision (its tensors are garbage, reclaimed by eviction or overwritten by
the next writer) and never a half-loaded model. The manifest is put with
``if_version=0``: a revision is an **immutable namespace** that is written
once; writing a committed revision again raises ``VersionConflict``. Publish
a change under a new prefix (``model/rev-42/``) and ``invalidate`` the old
one: that is the rollover path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorcache.client.api import Client
from tensorcache.errors import InvalidArgument, VersionConflict

FORMAT = "tensorcache.revision/1"


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not prefix.endswith("/") or len(prefix) > 512:
        raise InvalidArgument(
            f"prefix must be a str of at most 512 characters ending with '/', got {prefix!r}"
        )
    return prefix


def tensor_key(prefix: str, name: str) -> str:
    return f"{prefix}t/{name}"


def manifest_key(prefix: str) -> str:
    return f"{prefix}manifest"


@dataclass(frozen=True)
class TensorRecord:
    dtype: str  # torch dtype name ("bfloat16", "float32", ...)
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Manifest:
    prefix: str
    tensors: dict[str, TensorRecord]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.tensors.values())

    def keys(self) -> dict[str, str]:
        """tensor name -> its key in the cluster."""
        return {name: tensor_key(self.prefix, name) for name in self.tensors}

    def encode(self) -> np.ndarray:
        doc = {
            "format": FORMAT,
            "metadata": self.metadata,
            "tensors": {
                n: {"dtype": r.dtype, "shape": list(r.shape), "nbytes": r.nbytes}
                for n, r in self.tensors.items()
            },
        }
        return np.frombuffer(json.dumps(doc, sort_keys=True).encode(), np.uint8).copy()

    @classmethod
    def decode(cls, prefix: str, raw: Any) -> Manifest:
        try:
            doc = json.loads(np.asarray(raw, np.uint8).tobytes())
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, want {FORMAT!r}")
            tensors = {
                str(n): TensorRecord(
                    str(r["dtype"]), tuple(int(d) for d in r["shape"]), int(r["nbytes"])
                )
                for n, r in doc["tensors"].items()
            }
            metadata = {str(k): str(v) for k, v in doc.get("metadata", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidArgument(
                f"{manifest_key(prefix)!r} is not a revision manifest: {exc}"
            ) from exc
        return cls(prefix, tensors, metadata)


def read_manifest(client: Client, prefix: str) -> Manifest | None:
    """The committed manifest of revision ``prefix``, or None (absent or not committed yet)."""
    raw = client.get(manifest_key(check_prefix(prefix)))
    return None if raw is None else Manifest.decode(prefix, raw)


def commit(client: Client, manifest: Manifest, *, pin: bool = False) -> int:
    """Put the manifest (the commit point) if the revision is not committed yet.

    Raises ``VersionConflict`` if it is: revisions are immutable.
    """
    try:
        return client.put(manifest_key(manifest.prefix), manifest.encode(), if_version=0, pin=pin)
    except VersionConflict as exc:
        raise VersionConflict(
            f"revision {manifest.prefix!r} is already committed; a revision is immutable: "
            "write the new weights under a new prefix (and invalidate the old one)"
        ) from exc


def records(values: Mapping[str, Any]) -> dict[str, TensorRecord]:
    """name -> TensorRecord of torch tensors or numpy arrays."""
    from tensorcache.torch.tensors import describe

    return {name: describe(v) for name, v in values.items()}
