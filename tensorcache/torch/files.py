"""``load_safetensors``: a checkpoint file, read through the cluster.

The first worker (the holder of the revision's fill grant, client/fill.py)
streams the file into the cluster (tensorcache/torch/loader.py) and keeps a
copy of each tensor as it passes; every other worker, concurrent or later,
reads the committed revision from the cluster and never opens the file.
"""

from __future__ import annotations

import os
from typing import Any

from tensorcache.client.api import Client
from tensorcache.errors import Unavailable
from tensorcache.torch.loader import load_checkpoint
from tensorcache.torch.revision import check_prefix, manifest_key
from tensorcache.torch.state_dict import read_state_dict
from tensorcache.torch.tensors import as_torch


def load_safetensors(
    client: Client,
    path: str | os.PathLike[str],
    prefix: str,
    *,
    device: Any = None,
    pin: bool = False,
    verify: bool = False,
    lease_s: float = 10.0,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict of torch tensors on ``device``.

    From revision ``prefix`` in the cluster if it is there; else one worker
    cluster-wide reads the file and fills the revision while the others
    wait for it. ``verify``: the filler reads every tensor back
    (``tensorcache load`` does by default; a worker's fill need not).

    ``lease_s`` is 10 s here, not get_or_load's 2 s: a filler reading a large
    file on a busy host can starve its renewal thread for seconds, and a
    lapsed lease lets a second worker read the whole file too. A filler that
    dies is still replaced within ``lease_s``.
    """
    check_prefix(prefix)
    copies: dict[str, Any] = {}

    def keep(name: str, value: Any) -> None:
        # The value is a view of the loader's reused buffer: copy it out now.
        t = as_torch(value, None)
        copies[name] = t.to(device, copy=True) if device is not None else t.clone()

    def fill() -> dict[str, Any]:
        report = load_checkpoint(client, path, prefix, pin=pin, verify=verify, on_tensor=keep)
        if report.already:  # committed between our miss and our grant
            got = read_state_dict(client, prefix, device=device)
            if got is None:
                raise Unavailable(f"revision {prefix!r} was committed, then lost; try again")
            return got
        return copies

    got = client.fill_once(
        manifest_key(prefix),
        lookup=lambda: read_state_dict(client, prefix, device=device),
        load=fill,
        store=lambda _sd: None,  # load_checkpoint committed the manifest itself
        lease_s=lease_s,
        timeout_s=timeout_s,
    )
    return got
