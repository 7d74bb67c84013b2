from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ClientBatch(_message.Message):
    __slots__ = ("id", "clients")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    clients: int
    def __init__(self, id: _Optional[str] = ..., clients: _Optional[int] = ...) -> None: ...

class ClientsAccepted(_message.Message):
    __slots__ = ("accepted", "round")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    round: int
    def __init__(self, accepted: _Optional[int] = ..., round: _Optional[int] = ...) -> None: ...

class ClientRelease(_message.Message):
    __slots__ = ("id", "clients", "round")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    id: str
    clients: int
    round: int
    def __init__(self, id: _Optional[str] = ..., clients: _Optional[int] = ..., round: _Optional[int] = ...) -> None: ...

class ClientsReleased(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class AggregateReport(_message.Message):
    __slots__ = ("id", "round")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    id: str
    round: int
    def __init__(self, id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class ReportAnswer(_message.Message):
    __slots__ = ("taken",)
    TAKEN_FIELD_NUMBER: _ClassVar[int]
    taken: bool
    def __init__(self, taken: _Optional[bool] = ...) -> None: ...
