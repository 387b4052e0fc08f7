from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Candidate(_message.Message):
    __slots__ = ("ad_id", "advertiser_id", "category", "ad_format", "bid")
    AD_ID_FIELD_NUMBER: _ClassVar[int]
    ADVERTISER_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    AD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    BID_FIELD_NUMBER: _ClassVar[int]
    ad_id: int
    advertiser_id: int
    category: int
    ad_format: str
    bid: float
    def __init__(self, ad_id: _Optional[int] = ..., advertiser_id: _Optional[int] = ..., category: _Optional[int] = ..., ad_format: _Optional[str] = ..., bid: _Optional[float] = ...) -> None: ...

class Context(_message.Message):
    __slots__ = ("ts_ms", "hour", "device", "country", "age_bucket")
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    HOUR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    AGE_BUCKET_FIELD_NUMBER: _ClassVar[int]
    ts_ms: int
    hour: int
    device: str
    country: str
    age_bucket: int
    def __init__(self, ts_ms: _Optional[int] = ..., hour: _Optional[int] = ..., device: _Optional[str] = ..., country: _Optional[str] = ..., age_bucket: _Optional[int] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("user_id", "surface", "candidates", "context", "tasks", "value_task", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    VALUE_TASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    surface: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    context: Context
    tasks: _containers.RepeatedScalarFieldContainer[str]
    value_task: str
    request_id: str
    def __init__(self, user_id: _Optional[int] = ..., surface: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., context: _Optional[_Union[Context, _Mapping]] = ..., tasks: _Optional[_Iterable[str]] = ..., value_task: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CandidateScore(_message.Message):
    __slots__ = ("ad_id", "scores", "value")
    AD_ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ad_id: int
    scores: _containers.RepeatedScalarFieldContainer[float]
    value: float
    def __init__(self, ad_id: _Optional[int] = ..., scores: _Optional[_Iterable[float]] = ..., value: _Optional[float] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("model_version", "model_kind", "tasks", "value_task", "candidates", "order", "history_events", "request_id")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_KIND_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    VALUE_TASK_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    HISTORY_EVENTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    model_kind: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    value_task: str
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateScore]
    order: _containers.RepeatedScalarFieldContainer[int]
    history_events: int
    request_id: str
    def __init__(self, model_version: _Optional[str] = ..., model_kind: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., value_task: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[CandidateScore, _Mapping]]] = ..., order: _Optional[_Iterable[int]] = ..., history_events: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...
