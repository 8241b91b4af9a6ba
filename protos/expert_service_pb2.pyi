from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("expert_uid", "num_rows")
    EXPERT_UID_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    expert_uid: str
    num_rows: int
    def __init__(self, expert_uid: _Optional[str] = ..., num_rows: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("request_id", "segments", "inputs", "session_id", "counter", "timestamp_ms", "deadline_ms", "cancel")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    inputs: Tensor
    session_id: bytes
    counter: int
    timestamp_ms: int
    deadline_ms: int
    cancel: bool
    def __init__(self, request_id: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., session_id: _Optional[bytes] = ..., counter: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., cancel: _Optional[bool] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("request_id", "outputs", "queue_ms", "compute_ms", "receipt", "refusal")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    outputs: Tensor
    queue_ms: float
    compute_ms: float
    receipt: bytes
    refusal: Refusal
    def __init__(self, request_id: _Optional[str] = ..., outputs: _Optional[_Union[Tensor, _Mapping]] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., receipt: _Optional[bytes] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ...) -> None: ...

class SessionHello(_message.Message):
    __slots__ = ("client_identity", "client_ephemeral", "timestamp_ms", "signature")
    CLIENT_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client_identity: bytes
    client_ephemeral: bytes
    timestamp_ms: int
    signature: bytes
    def __init__(self, client_identity: _Optional[bytes] = ..., client_ephemeral: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SessionAccept(_message.Message):
    __slots__ = ("session_id", "ttl_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    ttl_s: int
    def __init__(self, session_id: _Optional[bytes] = ..., ttl_s: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("uid", "hidden_dim", "ffn_dim", "dtype", "kind")
    UID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    FFN_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    uid: str
    hidden_dim: int
    ffn_dim: int
    dtype: str
    kind: str
    def __init__(self, uid: _Optional[str] = ..., hidden_dim: _Optional[int] = ..., ffn_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("version", "protocol", "peer_id", "model_id", "experts", "max_message_bytes", "max_rows", "device", "state", "requests_served", "rows_served", "identity", "kx_public")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    ROWS_SERVED_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    KX_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    version: str
    protocol: str
    peer_id: str
    model_id: str
    experts: _containers.RepeatedCompositeFieldContainer[ExpertInfo]
    max_message_bytes: int
    max_rows: int
    device: str
    state: str
    requests_served: int
    rows_served: int
    identity: bytes
    kx_public: bytes
    def __init__(self, version: _Optional[str] = ..., protocol: _Optional[str] = ..., peer_id: _Optional[str] = ..., model_id: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ExpertInfo, _Mapping]]] = ..., max_message_bytes: _Optional[int] = ..., max_rows: _Optional[int] = ..., device: _Optional[str] = ..., state: _Optional[str] = ..., requests_served: _Optional[int] = ..., rows_served: _Optional[int] = ..., identity: _Optional[bytes] = ..., kx_public: _Optional[bytes] = ...) -> None: ...

class ReachabilityRequest(_message.Message):
    __slots__ = ("endpoint",)
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    def __init__(self, endpoint: _Optional[str] = ...) -> None: ...

class ReachabilityReply(_message.Message):
    __slots__ = ("reachable", "detail")
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reachable: bool
    detail: str
    def __init__(self, reachable: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...
