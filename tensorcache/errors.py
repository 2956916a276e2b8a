"""The one exception tree of tensorcache, and the one place gRPC errors map into it.

    TensorCacheError
    ├── InvalidArgument        (also a ValueError) bad key, dtype, shape, size
    ├── CapacityExceeded       the value cannot fit within the byte budget
    ├── Unavailable            no node or router could be reached in time
    ├── DataCorruption         a checksum or size check failed on received bytes
    ├── StaleEpoch             a node's ring view is newer than the request's
    ├── VersionConflict        put(..., if_version=v) found another version
    ├── ProtocolError          a peer broke the wire contract
    ├── Cancelled              (node side) the peer went away mid-call
    ├── Unauthenticated        no token, or one no node or router knows
    └── PermissionDenied       the token's grant does not cover this key / operation

A cache miss is never an exception: reads say ``None`` / ``found``.
"""

from __future__ import annotations

import grpc


class TensorCacheError(Exception):
    """Base of every error tensorcache raises."""


class InvalidArgument(TensorCacheError, ValueError):
    """The request is malformed: the message names the field and the problem."""


class CapacityExceeded(TensorCacheError):
    """The value is larger than a node's (or the cluster's) byte budget."""


class Unavailable(TensorCacheError):
    """A node or the router could not be reached or timed out."""


class DataCorruption(TensorCacheError):
    """Received bytes do not match their checksum or declared size."""


class StaleEpoch(TensorCacheError):
    """The request was placed with an older ring snapshot than the node's."""

    def __init__(self, message: str, epoch: int = 0) -> None:
        super().__init__(message)
        self.epoch = epoch


class VersionConflict(TensorCacheError):
    """A conditional put found another version than the one it was made for."""


class ProtocolError(TensorCacheError):
    """A peer sent something the wire contract does not allow."""


class Unauthenticated(TensorCacheError):
    """The call carried no token, or one the server does not know (docs/security.md)."""


class PermissionDenied(TensorCacheError):
    """The token is known but its grant does not cover the key prefix or operation."""


EPOCH_METADATA_KEY = "tc-epoch"

_BY_CODE: dict[grpc.StatusCode, type[TensorCacheError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.CANCELLED: Unavailable,
    grpc.StatusCode.DATA_LOSS: DataCorruption,
    grpc.StatusCode.FAILED_PRECONDITION: StaleEpoch,
    grpc.StatusCode.ABORTED: VersionConflict,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


class Cancelled(TensorCacheError):
    """The peer went away mid-call (used by nodes; clients see Unavailable)."""


# The status a node answers for each error it raises (first match wins).
_STATUS_OF: tuple[tuple[type[TensorCacheError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (CapacityExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DataCorruption, grpc.StatusCode.DATA_LOSS),
    (StaleEpoch, grpc.StatusCode.FAILED_PRECONDITION),
    (VersionConflict, grpc.StatusCode.ABORTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)


def status_code(exc: TensorCacheError) -> grpc.StatusCode:
    """The gRPC status a server answers for ``exc``."""
    for cls, code in _STATUS_OF:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def from_status(code: grpc.StatusCode | None, details: str, epoch: int = 0) -> TensorCacheError:
    """Build the client-side exception for a status (gRPC or data channel)."""
    cls = _BY_CODE.get(code, TensorCacheError) if code is not None else TensorCacheError
    if cls is StaleEpoch:
        return StaleEpoch(details, epoch)
    if cls is TensorCacheError and code is not None:
        details = f"{details} ({code.name})"
    return cls(details)


def from_rpc_error(exc: grpc.RpcError, where: str) -> TensorCacheError:
    """Map a gRPC error to the exception tree; ``where`` names the peer/call.

    The caller raises the result ``from exc`` so the gRPC detail is kept.
    """
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    epoch = 0
    for md in (exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else ():
        if md.key == EPOCH_METADATA_KEY and str(md.value).isdigit():
            epoch = int(md.value)
    return from_status(code, f"{where}: {details}", epoch)
