"""State dicts as revisions: put, load, and fill once cluster-wide on a miss.

A state dict is put under a revision prefix (tensorcache/torch/revision.py:
tensors first, the manifest last as the commit point, immutable once
committed). Loading reads the manifest first: no manifest, no revision (a
miss is ``None``, as for ``Client.get``); then every tensor, each checked
against the manifest's dtype and shape.

``get_or_load_state_dict`` is ``Client.get_or_load`` for a whole state dict:
the manifest key is the fill key (client/fill.py), so exactly one worker in
the cluster runs the loader and puts the revision while the others wait for
its manifest, and a filler that dies is replaced within ``lease_s``.

A committed revision whose tensors are no longer all there (evicted: pin
revisions you cannot afford to reload) is broken, not partly usable: the
reader that finds it so deletes its manifest, and the revision is filled
again like any miss (by ``get_or_load_state_dict``; ``load_state_dict``
returns ``None``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from tensorcache.client.api import Client
from tensorcache.errors import InvalidArgument, VersionConflict
from tensorcache.torch.revision import (
    Manifest,
    check_prefix,
    commit,
    manifest_key,
    read_manifest,
    records,
    tensor_key,
)
from tensorcache.torch.tensors import as_torch, dtype_name

log = logging.getLogger("tensorcache.torch")

MIB = 1024 * 1024
BATCH_BYTES = 64 * MIB  # one put_many / get_many at a time


def put_state_dict(
    client: Client,
    prefix: str,
    state_dict: Mapping[str, Any],
    *,
    pin: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Manifest:
    """Put every tensor of ``state_dict`` under revision ``prefix``, then its manifest.

    Raises ``VersionConflict`` (and writes nothing) if the revision is
    committed already: revisions are immutable. ``pin``: pin every tensor
    and the manifest (node/pins.py).
    """
    check_prefix(prefix)
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise InvalidArgument("state_dict must be a non-empty mapping of name -> tensor")
    if read_manifest(client, prefix) is not None:
        raise VersionConflict(f"revision {prefix!r} is already committed; revisions are immutable")
    manifest = Manifest(prefix, records(state_dict), dict(metadata or {}))
    batch: dict[str, Any] = {}
    size = 0
    for name, value in state_dict.items():
        batch[tensor_key(prefix, name)] = value
        size += manifest.tensors[name].nbytes
        if size >= BATCH_BYTES:
            client.put_many(batch, pin=pin)
            batch, size = {}, 0
    if batch:
        client.put_many(batch, pin=pin)
    commit(client, manifest, pin=pin)  # the commit point: visible from here on
    return manifest


def _fetch(client: Client, manifest: Manifest, device: Any = None) -> dict[str, Any] | None:
    """Every tensor of ``manifest`` as torch tensors on ``device``, or None if one is missing."""
    out: dict[str, Any] = {}
    keys = manifest.keys()
    names = list(manifest.tensors)
    start = 0
    while start < len(names):
        chunk: list[str] = []
        size = 0
        while start < len(names) and (not chunk or size < BATCH_BYTES):
            chunk.append(names[start])
            size += manifest.tensors[names[start]].nbytes
            start += 1
        got = client.get_many([keys[n] for n in chunk], device=device, as_="torch")
        for n in chunk:
            value = got[keys[n]]
            if value is None:
                return None
            rec = manifest.tensors[n]
            if dtype_name(value) != rec.dtype or tuple(value.shape) != rec.shape:
                raise InvalidArgument(
                    f"{keys[n]!r} is {dtype_name(value)} {tuple(value.shape)}, its revision's "
                    f"manifest says {rec.dtype} {rec.shape}: was it overwritten by hand?"
                )
            out[n] = value
    return out


def _drop_broken(client: Client, prefix: str) -> None:
    log.warning(
        "revision %r: its manifest is committed but a tensor is gone (evicted?); "
        "deleting the manifest so it is filled again",
        prefix,
    )
    client.delete(manifest_key(prefix))


def read_state_dict(client: Client, prefix: str, *, device: Any = None) -> dict[str, Any] | None:
    """The committed revision ``prefix`` as a dict of torch tensors, or None (a miss)."""
    manifest = read_manifest(client, check_prefix(prefix))
    if manifest is None:
        return None
    got = _fetch(client, manifest, device)
    if got is None:
        _drop_broken(client, prefix)
    return got


def load_state_dict(
    client: Client, prefix: str, module_or_template: Any = None, *, device: Any = None
) -> Any:
    """Load revision ``prefix``; None if it is not in the cluster (a miss).

    ``module_or_template``: an ``nn.Module`` (its parameters and buffers are
    filled in place, names, dtypes and shapes must match exactly; returns
    the module), a mapping of name -> tensor to fill in place (returned), or
    None (returns a new dict of tensors on ``device``, CPU by default).
    """
    if module_or_template is None:
        return read_state_dict(client, prefix, device=device)
    import torch

    if isinstance(module_or_template, torch.nn.Module):
        targets = module_or_template.state_dict()
    elif isinstance(module_or_template, Mapping):
        targets = dict(module_or_template)
    else:
        raise InvalidArgument(
            "module_or_template must be an nn.Module, a mapping of name -> tensor, or None; "
            f"got {type(module_or_template).__name__}"
        )
    manifest = read_manifest(client, check_prefix(prefix))
    if manifest is None:
        return None
    missing = sorted(set(targets) - set(manifest.tensors))
    unexpected = sorted(set(manifest.tensors) - set(targets))
    if missing or unexpected:
        raise InvalidArgument(
            f"revision {prefix!r} does not match: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, t in targets.items():
        rec = manifest.tensors[name]
        if dtype_name(t) != rec.dtype or tuple(t.shape) != rec.shape:
            raise InvalidArgument(
                f"{name!r}: the target is {dtype_name(t)} {tuple(t.shape)}, "
                f"revision {prefix!r} has {rec.dtype} {rec.shape}"
            )
    if device is not None and isinstance(module_or_template, torch.nn.Module):
        module_or_template.to(device)
        targets = module_or_template.state_dict()
    # Straight into the targets' memory (get(out=): no second copy of the
    # weights, CUDA included); large tensors one by one, small ones batched.
    keys = manifest.keys()
    small = [n for n, t in targets.items() if t.numel() * t.element_size() < MIB]
    with torch.no_grad():
        for name, t in targets.items():
            if name not in small and client.get(keys[name], out=t) is None:
                _drop_broken(client, prefix)
                return None
        got = client.get_many([keys[n] for n in small], as_="torch")
        for name in small:
            v = got[keys[name]]
            if v is None:
                _drop_broken(client, prefix)
                return None
            targets[name].copy_(v)
    return module_or_template


def get_or_load_state_dict(
    client: Client,
    prefix: str,
    loader: Callable[[], Mapping[str, Any]],
    *,
    device: Any = None,
    pin: bool = False,
    lease_s: float = 2.0,
    max_load_s: float | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Revision ``prefix``; on a miss, one worker cluster-wide runs ``loader()`` and puts it.

    Waiters read the revision once its manifest is committed. Lease and
    timeout options as for ``Client.get_or_load``.
    """
    check_prefix(prefix)

    def store(sd: Mapping[str, Any]) -> None:
        try:
            put_state_dict(client, prefix, sd, pin=pin)
        except VersionConflict:
            log.info("revision %r: committed by another worker meanwhile; keeping theirs", prefix)

    value = client.fill_once(
        manifest_key(prefix),
        lookup=lambda: read_state_dict(client, prefix, device=device),
        load=lambda: dict(loader()),
        store=store,
        lease_s=lease_s,
        max_load_s=max_load_s,
        timeout_s=timeout_s,
    )
    return {n: as_torch(v, device) for n, v in value.items()}
