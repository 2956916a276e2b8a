"""The exception tree and the gRPC status mapping."""

from __future__ import annotations

from typing import NamedTuple

import grpc
import pytest

from tensorcache import errors
from tensorcache.errors import (
    EPOCH_METADATA_KEY,
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
    from_rpc_error,
)

pytestmark = pytest.mark.unit


class Metadatum(NamedTuple):  # the shape of grpc's trailing metadata items
    key: str
    value: str | bytes


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details="boom", trailing=()):
        super().__init__(details)
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.OUT_OF_RANGE, InvalidArgument),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, CapacityExceeded),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, Unavailable),
        (grpc.StatusCode.CANCELLED, Unavailable),
        (grpc.StatusCode.DATA_LOSS, DataCorruption),
        (grpc.StatusCode.FAILED_PRECONDITION, StaleEpoch),
        (grpc.StatusCode.ABORTED, VersionConflict),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
    ],
)
def test_mapping_table(code, cls):
    err = from_rpc_error(FakeRpcError(code, "the detail"), "node-a:7070 Put")
    assert type(err) is cls
    assert str(err) == "node-a:7070 Put: the detail"


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.ALREADY_EXISTS,
    ],
)
def test_unmapped_codes_are_the_base_error_naming_the_code(code):
    err = from_rpc_error(FakeRpcError(code, "weird"), "router")
    assert type(err) is TensorCacheError
    assert str(err) == f"router: weird ({code.name})"


def test_stale_epoch_reads_epoch_from_trailing_metadata():
    trailing = (Metadatum("other", "x"), Metadatum(EPOCH_METADATA_KEY, "42"))
    err = from_rpc_error(
        FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "stale", trailing), "node-b Get"
    )
    assert isinstance(err, StaleEpoch)
    assert err.epoch == 42
    assert str(err) == "node-b Get: stale"
    assert EPOCH_METADATA_KEY == "tc-epoch"


def test_stale_epoch_accepts_grpc_metadatum_objects():
    from grpc._cython import cygrpc  # the type real calls put in trailing_metadata()

    trailing = (cygrpc._Metadatum("tc-epoch", "7"),)
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "s", trailing), "n")
    assert err.epoch == 7


@pytest.mark.parametrize("trailing", [(), None, (Metadatum("tc-other", "9"),)])
def test_stale_epoch_without_metadata_is_epoch_zero(trailing):
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "s", trailing), "n")
    assert type(err) is StaleEpoch
    assert err.epoch == 0


def test_error_without_code_is_the_base_error():
    class Bare(grpc.RpcError):
        pass

    err = from_rpc_error(Bare("no status"), "router")
    assert type(err) is TensorCacheError
    assert str(err) == "router: no status"


def test_tree():
    for cls in (
        InvalidArgument,
        CapacityExceeded,
        Unavailable,
        DataCorruption,
        StaleEpoch,
        ProtocolError,
        Unauthenticated,
        PermissionDenied,
    ):
        assert issubclass(cls, TensorCacheError)
    assert issubclass(InvalidArgument, ValueError)
    assert not issubclass(CapacityExceeded, ValueError)
    assert StaleEpoch("m").epoch == 0
    assert StaleEpoch("m", 5).epoch == 5


def test_package_reexports_the_tree():
    import tensorcache

    for name in (
        "TensorCacheError",
        "InvalidArgument",
        "CapacityExceeded",
        "Unavailable",
        "DataCorruption",
        "StaleEpoch",
        "ProtocolError",
        "Unauthenticated",
        "PermissionDenied",
    ):
        assert getattr(tensorcache, name) is getattr(errors, name)
        assert name in tensorcache.__all__


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (Unauthenticated("no token"), grpc.StatusCode.UNAUTHENTICATED),
        (PermissionDenied("not yours"), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_auth_errors_have_their_own_status(exc, code):
    assert errors.status_code(exc) == code
