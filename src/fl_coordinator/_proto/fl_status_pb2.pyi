from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stages(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SELECTION: _ClassVar[Stages]
    CONFIGURATION: _ClassVar[Stages]
    REPORTING: _ClassVar[Stages]
    COMPLETED: _ClassVar[Stages]
SELECTION: Stages
CONFIGURATION: Stages
REPORTING: Stages
COMPLETED: Stages

class FlRoundStatus(_message.Message):
    __slots__ = ("stage", "roundNo")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROUNDNO_FIELD_NUMBER: _ClassVar[int]
    stage: Stages
    roundNo: int
    def __init__(self, stage: _Optional[_Union[Stages, str]] = ..., roundNo: _Optional[int] = ...) -> None: ...

class NULL(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
