from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EntryKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR: _ClassVar[EntryKind]
    SHARD: _ClassVar[EntryKind]
TENSOR: EntryKind
SHARD: EntryKind

class StripeRef(_message.Message):
    __slots__ = ("key", "offset", "nbytes", "crc32c")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    offset: int
    nbytes: int
    crc32c: int
    def __init__(self, key: _Optional[bytes] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., crc32c: _Optional[int] = ...) -> None: ...

class TensorMeta(_message.Message):
    __slots__ = ("dtype", "shape", "order", "nbytes", "crc32c", "stripes", "put_id", "compression", "logical_dtype", "pinned")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    STRIPES_FIELD_NUMBER: _ClassVar[int]
    PUT_ID_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    order: str
    nbytes: int
    crc32c: int
    stripes: _containers.RepeatedCompositeFieldContainer[StripeRef]
    put_id: int
    compression: Compression
    logical_dtype: str
    pinned: bool
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., order: _Optional[str] = ..., nbytes: _Optional[int] = ..., crc32c: _Optional[int] = ..., stripes: _Optional[_Iterable[_Union[StripeRef, _Mapping]]] = ..., put_id: _Optional[int] = ..., compression: _Optional[_Union[Compression, _Mapping]] = ..., logical_dtype: _Optional[str] = ..., pinned: _Optional[bool] = ...) -> None: ...

class Compression(_message.Message):
    __slots__ = ("codec", "shuffle", "dtype", "shape", "order", "nbytes")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    codec: str
    shuffle: bool
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    order: str
    nbytes: int
    def __init__(self, codec: _Optional[str] = ..., shuffle: _Optional[bool] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., order: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class EntryPut(_message.Message):
    __slots__ = ("key", "kind", "meta", "if_version", "version", "stamp")
    KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    IF_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STAMP_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    kind: EntryKind
    meta: TensorMeta
    if_version: int
    version: int
    stamp: int
    def __init__(self, key: _Optional[bytes] = ..., kind: _Optional[_Union[EntryKind, str]] = ..., meta: _Optional[_Union[TensorMeta, _Mapping]] = ..., if_version: _Optional[int] = ..., version: _Optional[int] = ..., stamp: _Optional[int] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("epoch", "entries")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    entries: _containers.RepeatedCompositeFieldContainer[EntryPut]
    def __init__(self, epoch: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[EntryPut, _Mapping]]] = ...) -> None: ...

class PutResult(_message.Message):
    __slots__ = ("key", "version", "replaced_stripes", "kept_newer")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLACED_STRIPES_FIELD_NUMBER: _ClassVar[int]
    KEPT_NEWER_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    version: int
    replaced_stripes: _containers.RepeatedCompositeFieldContainer[StripeRef]
    kept_newer: bool
    def __init__(self, key: _Optional[bytes] = ..., version: _Optional[int] = ..., replaced_stripes: _Optional[_Iterable[_Union[StripeRef, _Mapping]]] = ..., kept_newer: _Optional[bool] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("epoch", "results")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    results: _containers.RepeatedCompositeFieldContainer[PutResult]
    def __init__(self, epoch: _Optional[int] = ..., results: _Optional[_Iterable[_Union[PutResult, _Mapping]]] = ...) -> None: ...

class EntryKey(_message.Message):
    __slots__ = ("key", "kind")
    KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    kind: EntryKind
    def __init__(self, key: _Optional[bytes] = ..., kind: _Optional[_Union[EntryKind, str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("epoch", "keys", "head_only", "local", "handoff")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    HEAD_ONLY_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    keys: _containers.RepeatedCompositeFieldContainer[EntryKey]
    head_only: bool
    local: bool
    handoff: bool
    def __init__(self, epoch: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[EntryKey, _Mapping]]] = ..., head_only: _Optional[bool] = ..., local: _Optional[bool] = ..., handoff: _Optional[bool] = ...) -> None: ...

class EntryGot(_message.Message):
    __slots__ = ("key", "found", "version", "meta", "local", "stamp", "settled")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    STAMP_FIELD_NUMBER: _ClassVar[int]
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    found: bool
    version: int
    meta: TensorMeta
    local: _containers.RepeatedCompositeFieldContainer[LocalChunk]
    stamp: int
    settled: bool
    def __init__(self, key: _Optional[bytes] = ..., found: _Optional[bool] = ..., version: _Optional[int] = ..., meta: _Optional[_Union[TensorMeta, _Mapping]] = ..., local: _Optional[_Iterable[_Union[LocalChunk, _Mapping]]] = ..., stamp: _Optional[int] = ..., settled: _Optional[bool] = ...) -> None: ...

class LocalChunk(_message.Message):
    __slots__ = ("addr", "nbytes")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    addr: int
    nbytes: int
    def __init__(self, addr: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class GetReply(_message.Message):
    __slots__ = ("epoch", "entries")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    entries: _containers.RepeatedCompositeFieldContainer[EntryGot]
    def __init__(self, epoch: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[EntryGot, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("epoch", "keys")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    keys: _containers.RepeatedCompositeFieldContainer[EntryKey]
    def __init__(self, epoch: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[EntryKey, _Mapping]]] = ...) -> None: ...

class DeleteResult(_message.Message):
    __slots__ = ("key", "found", "stripes")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    STRIPES_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    found: bool
    stripes: _containers.RepeatedCompositeFieldContainer[StripeRef]
    def __init__(self, key: _Optional[bytes] = ..., found: _Optional[bool] = ..., stripes: _Optional[_Iterable[_Union[StripeRef, _Mapping]]] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("epoch", "results")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    results: _containers.RepeatedCompositeFieldContainer[DeleteResult]
    def __init__(self, epoch: _Optional[int] = ..., results: _Optional[_Iterable[_Union[DeleteResult, _Mapping]]] = ...) -> None: ...

class FillRequest(_message.Message):
    __slots__ = ("epoch", "key", "holder", "ttl_ms", "release", "filler")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    FILLER_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    key: bytes
    holder: str
    ttl_ms: int
    release: bool
    filler: str
    def __init__(self, epoch: _Optional[int] = ..., key: _Optional[bytes] = ..., holder: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., release: _Optional[bool] = ..., filler: _Optional[str] = ...) -> None: ...

class FillReply(_message.Message):
    __slots__ = ("granted", "found", "lease_left_ms", "holder", "filler")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    LEASE_LEFT_MS_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    FILLER_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    found: bool
    lease_left_ms: int
    holder: str
    filler: str
    def __init__(self, granted: _Optional[bool] = ..., found: _Optional[bool] = ..., lease_left_ms: _Optional[int] = ..., holder: _Optional[str] = ..., filler: _Optional[str] = ...) -> None: ...

class StatRequest(_message.Message):
    __slots__ = ("hot_keys",)
    HOT_KEYS_FIELD_NUMBER: _ClassVar[int]
    hot_keys: int
    def __init__(self, hot_keys: _Optional[int] = ...) -> None: ...

class HotKey(_message.Message):
    __slots__ = ("key", "nbytes", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    nbytes: int
    version: int
    def __init__(self, key: _Optional[bytes] = ..., nbytes: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class NodeStats(_message.Message):
    __slots__ = ("name", "address", "keys", "shards", "bytes_used", "bytes_reserved", "capacity", "hits", "misses", "evictions", "puts", "deletes", "policy", "epoch", "fills", "fill_waits", "handoffs", "drained", "demoted", "invalidated", "rereplicated", "moved", "discarded", "pending", "revived", "disk_capacity", "disk_bytes", "disk_files", "disk_hits", "disk_spills", "disk_write_drops", "disk_evictions", "disk_corrupt", "disk_loaded", "hot", "pinned_bytes", "pinned_capacity", "pinned", "pins_dropped")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RESERVED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    DELETES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FILLS_FIELD_NUMBER: _ClassVar[int]
    FILL_WAITS_FIELD_NUMBER: _ClassVar[int]
    HANDOFFS_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    DEMOTED_FIELD_NUMBER: _ClassVar[int]
    INVALIDATED_FIELD_NUMBER: _ClassVar[int]
    REREPLICATED_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    REVIVED_FIELD_NUMBER: _ClassVar[int]
    DISK_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FILES_FIELD_NUMBER: _ClassVar[int]
    DISK_HITS_FIELD_NUMBER: _ClassVar[int]
    DISK_SPILLS_FIELD_NUMBER: _ClassVar[int]
    DISK_WRITE_DROPS_FIELD_NUMBER: _ClassVar[int]
    DISK_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    DISK_CORRUPT_FIELD_NUMBER: _ClassVar[int]
    DISK_LOADED_FIELD_NUMBER: _ClassVar[int]
    HOT_FIELD_NUMBER: _ClassVar[int]
    PINNED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    PINS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    keys: int
    shards: int
    bytes_used: int
    bytes_reserved: int
    capacity: int
    hits: int
    misses: int
    evictions: int
    puts: int
    deletes: int
    policy: str
    epoch: int
    fills: int
    fill_waits: int
    handoffs: int
    drained: int
    demoted: int
    invalidated: int
    rereplicated: int
    moved: int
    discarded: int
    pending: int
    revived: int
    disk_capacity: int
    disk_bytes: int
    disk_files: int
    disk_hits: int
    disk_spills: int
    disk_write_drops: int
    disk_evictions: int
    disk_corrupt: int
    disk_loaded: int
    hot: _containers.RepeatedCompositeFieldContainer[HotKey]
    pinned_bytes: int
    pinned_capacity: int
    pinned: int
    pins_dropped: int
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., keys: _Optional[int] = ..., shards: _Optional[int] = ..., bytes_used: _Optional[int] = ..., bytes_reserved: _Optional[int] = ..., capacity: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., puts: _Optional[int] = ..., deletes: _Optional[int] = ..., policy: _Optional[str] = ..., epoch: _Optional[int] = ..., fills: _Optional[int] = ..., fill_waits: _Optional[int] = ..., handoffs: _Optional[int] = ..., drained: _Optional[int] = ..., demoted: _Optional[int] = ..., invalidated: _Optional[int] = ..., rereplicated: _Optional[int] = ..., moved: _Optional[int] = ..., discarded: _Optional[int] = ..., pending: _Optional[int] = ..., revived: _Optional[int] = ..., disk_capacity: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., disk_files: _Optional[int] = ..., disk_hits: _Optional[int] = ..., disk_spills: _Optional[int] = ..., disk_write_drops: _Optional[int] = ..., disk_evictions: _Optional[int] = ..., disk_corrupt: _Optional[int] = ..., disk_loaded: _Optional[int] = ..., hot: _Optional[_Iterable[_Union[HotKey, _Mapping]]] = ..., pinned_bytes: _Optional[int] = ..., pinned_capacity: _Optional[int] = ..., pinned: _Optional[int] = ..., pins_dropped: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("epoch", "prefix", "unpin")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    UNPIN_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    prefix: str
    unpin: bool
    def __init__(self, epoch: _Optional[int] = ..., prefix: _Optional[str] = ..., unpin: _Optional[bool] = ...) -> None: ...

class PinReply(_message.Message):
    __slots__ = ("entries", "bytes")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    entries: int
    bytes: int
    def __init__(self, entries: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class FenceRequest(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class FenceReply(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class DataError(_message.Message):
    __slots__ = ("code", "message", "epoch")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    epoch: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class DataTicketRequest(_message.Message):
    __slots__ = ("client_host", "client_port")
    CLIENT_HOST_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PORT_FIELD_NUMBER: _ClassVar[int]
    client_host: str
    client_port: int
    def __init__(self, client_host: _Optional[str] = ..., client_port: _Optional[int] = ...) -> None: ...

class DataTicketReply(_message.Message):
    __slots__ = ("ticket", "ttl_ms")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    ttl_ms: int
    def __init__(self, ticket: _Optional[bytes] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class DataTicketBody(_message.Message):
    __slots__ = ("key_id", "expires_ms", "nonce", "node", "client_host", "client_port", "identity", "has_grant", "grant_name")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HOST_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PORT_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    HAS_GRANT_FIELD_NUMBER: _ClassVar[int]
    GRANT_NAME_FIELD_NUMBER: _ClassVar[int]
    key_id: int
    expires_ms: int
    nonce: bytes
    node: str
    client_host: str
    client_port: int
    identity: str
    has_grant: bool
    grant_name: str
    def __init__(self, key_id: _Optional[int] = ..., expires_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., node: _Optional[str] = ..., client_host: _Optional[str] = ..., client_port: _Optional[int] = ..., identity: _Optional[str] = ..., has_grant: _Optional[bool] = ..., grant_name: _Optional[str] = ...) -> None: ...

class DataTicket(_message.Message):
    __slots__ = ("body", "mac")
    BODY_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    mac: bytes
    def __init__(self, body: _Optional[bytes] = ..., mac: _Optional[bytes] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("name", "address", "capacity", "data_address", "local_pid", "local_token_addr", "local_token", "incarnation", "data_ticket")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PID_FIELD_NUMBER: _ClassVar[int]
    LOCAL_TOKEN_ADDR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    DATA_TICKET_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    capacity: int
    data_address: str
    local_pid: int
    local_token_addr: int
    local_token: bytes
    incarnation: int
    data_ticket: bool
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., capacity: _Optional[int] = ..., data_address: _Optional[str] = ..., local_pid: _Optional[int] = ..., local_token_addr: _Optional[int] = ..., local_token: _Optional[bytes] = ..., incarnation: _Optional[int] = ..., data_ticket: _Optional[bool] = ...) -> None: ...

class RingSnapshot(_message.Message):
    __slots__ = ("epoch", "members", "stripe_size", "vnodes", "weight_unit", "replicas", "invalidations", "earlier")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    STRIPE_SIZE_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_UNIT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    INVALIDATIONS_FIELD_NUMBER: _ClassVar[int]
    EARLIER_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    stripe_size: int
    vnodes: int
    weight_unit: int
    replicas: int
    invalidations: _containers.RepeatedCompositeFieldContainer[Invalidation]
    earlier: _containers.RepeatedCompositeFieldContainer[PastPlacement]
    def __init__(self, epoch: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., stripe_size: _Optional[int] = ..., vnodes: _Optional[int] = ..., weight_unit: _Optional[int] = ..., replicas: _Optional[int] = ..., invalidations: _Optional[_Iterable[_Union[Invalidation, _Mapping]]] = ..., earlier: _Optional[_Iterable[_Union[PastPlacement, _Mapping]]] = ...) -> None: ...

class PastPlacement(_message.Message):
    __slots__ = ("epoch", "members", "ended_ms_ago")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    ENDED_MS_AGO_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    ended_ms_ago: int
    def __init__(self, epoch: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., ended_ms_ago: _Optional[int] = ...) -> None: ...

class Invalidation(_message.Message):
    __slots__ = ("prefix", "epoch")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    epoch: int
    def __init__(self, prefix: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("prefix",)
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    def __init__(self, prefix: _Optional[str] = ...) -> None: ...

class InvalidateReply(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class KeyEvent(_message.Message):
    __slots__ = ("key", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    version: int
    def __init__(self, key: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("node", "events", "lost", "relayed")
    NODE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    RELAYED_FIELD_NUMBER: _ClassVar[int]
    node: str
    events: _containers.RepeatedCompositeFieldContainer[KeyEvent]
    lost: bool
    relayed: bool
    def __init__(self, node: _Optional[str] = ..., events: _Optional[_Iterable[_Union[KeyEvent, _Mapping]]] = ..., lost: _Optional[bool] = ..., relayed: _Optional[bool] = ...) -> None: ...

class PublishReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("epoch", "keys", "invalidations", "reset", "complete")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    INVALIDATIONS_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    keys: _containers.RepeatedCompositeFieldContainer[KeyEvent]
    invalidations: _containers.RepeatedCompositeFieldContainer[Invalidation]
    reset: bool
    complete: bool
    def __init__(self, epoch: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[KeyEvent, _Mapping]]] = ..., invalidations: _Optional[_Iterable[_Union[Invalidation, _Mapping]]] = ..., reset: _Optional[bool] = ..., complete: _Optional[bool] = ...) -> None: ...

class RouterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouterStatus(_message.Message):
    __slots__ = ("state", "detail", "epoch", "members", "membership", "replicas")
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    state: str
    detail: str
    epoch: int
    members: int
    membership: str
    replicas: int
    def __init__(self, state: _Optional[str] = ..., detail: _Optional[str] = ..., epoch: _Optional[int] = ..., members: _Optional[int] = ..., membership: _Optional[str] = ..., replicas: _Optional[int] = ...) -> None: ...

class GetRingRequest(_message.Message):
    __slots__ = ("earlier",)
    EARLIER_FIELD_NUMBER: _ClassVar[int]
    earlier: bool
    def __init__(self, earlier: _Optional[bool] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("member",)
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    member: Member
    def __init__(self, member: _Optional[_Union[Member, _Mapping]] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("epoch", "heartbeat_interval_s", "ttl_s")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    heartbeat_interval_s: float
    ttl_s: float
    def __init__(self, epoch: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("epoch", "known")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    known: bool
    def __init__(self, epoch: _Optional[int] = ..., known: _Optional[bool] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeregisterReply(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...
