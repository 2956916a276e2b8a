"""tensorcache: a distributed tensor cache for GPU inference workers.

import tensorcache
with tensorcache.connect("127.0.0.1:7070") as c:
    c.put("model/layer0.weight", array)
    a = c.get("model/layer0.weight")
"""

from tensorcache.client.api import Client, ClientConfig, NodeStats, connect
from tensorcache.errors import (
    CapacityExceeded,
    DataCorruption,
    InvalidArgument,
    PermissionDenied,
    ProtocolError,
    StaleEpoch,
    TensorCacheError,
    Unauthenticated,
    Unavailable,
    VersionConflict,
)
from tensorcache.tls import TLSFiles

__all__ = [
    "CapacityExceeded",
    "Client",
    "ClientConfig",
    "DataCorruption",
    "InvalidArgument",
    "NodeStats",
    "PermissionDenied",
    "ProtocolError",
    "StaleEpoch",
    "TLSFiles",
    "TensorCacheError",
    "Unauthenticated",
    "Unavailable",
    "VersionConflict",
    "connect",
]
__version__ = "0.1.0"
