"""torch-level helpers for GPU workers: model weights and activations in the cluster.

- ``load_checkpoint`` (``tensorcache load``): a safetensors checkpoint
  streamed tensor by tensor into the cluster as a *revision*
  (tensorcache/torch/revision.py): tensors under a prefix, committed by a
  manifest written last, immutable once committed.

Every function takes the ``Client`` first: no hidden global connection.
torch itself is imported lazily, where torch tensors are made, so this
package imports (and ``tensorcache load`` runs) without it.
"""

from __future__ import annotations

from tensorcache.torch.loader import LoadReport, load_checkpoint
from tensorcache.torch.revision import Manifest, read_manifest

__all__ = ["LoadReport", "Manifest", "load_checkpoint", "read_manifest"]
