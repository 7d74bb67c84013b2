from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FL_FILES: _ClassVar[Type]
    FL_INT: _ClassVar[Type]
FL_FILES: Type
FL_INT: Type

class CheckInRequest(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class FlData(_message.Message):
    __slots__ = ("chunk", "intVal", "type", "isLastChunk", "filePath")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    INTVAL_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ISLASTCHUNK_FIELD_NUMBER: _ClassVar[int]
    FILEPATH_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    intVal: int
    type: Type
    isLastChunk: bool
    filePath: str
    def __init__(self, chunk: _Optional[bytes] = ..., intVal: _Optional[int] = ..., type: _Optional[_Union[Type, str]] = ..., isLastChunk: _Optional[bool] = ..., filePath: _Optional[str] = ...) -> None: ...
