"""torch-level helpers for GPU workers: model weights and activations in the cluster.

- ``put_state_dict`` / ``load_state_dict`` / ``get_or_load_state_dict``: a
  state dict as a *revision* (tensorcache/torch/revision.py): tensors under a
  prefix, committed by a manifest written last, immutable once committed,
  filled once cluster-wide on a miss.
- ``load_checkpoint`` (``tensorcache load``) and ``load_safetensors``:
  safetensors checkpoints streamed tensor by tensor into the cluster; the
  latter is read-through (the first worker reads the file, the others the
  cluster).
- ``Memo`` / ``memoize``: activations keyed by a content hash of the inputs.
- ``stream_layers``: a model's blocks fetched just before their forward.

Every function takes the ``Client`` first: no hidden global connection.
torch itself is imported lazily, where torch tensors are made, so this
package imports (and ``tensorcache load`` runs) without it.
"""

from __future__ import annotations

from tensorcache.torch.activations import Memo, input_key, memoize
from tensorcache.torch.files import load_safetensors
from tensorcache.torch.loader import LoadReport, load_checkpoint
from tensorcache.torch.revision import Manifest, read_manifest
from tensorcache.torch.state_dict import (
    get_or_load_state_dict,
    load_state_dict,
    put_state_dict,
    read_state_dict,
)
from tensorcache.torch.streaming import LayerStreamer, stream_layers

__all__ = [
    "LayerStreamer",
    "LoadReport",
    "Manifest",
    "Memo",
    "get_or_load_state_dict",
    "input_key",
    "load_checkpoint",
    "load_safetensors",
    "load_state_dict",
    "memoize",
    "put_state_dict",
    "read_manifest",
    "read_state_dict",
    "stream_layers",
]
