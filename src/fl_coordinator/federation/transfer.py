"""Files over ``FlData`` streams: 64 KiB ``FL_FILES`` chunks, and the ``FL_INT`` messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import trio

from .._proto import fl_round_pb2

__all__ = ["FlData", "file_chunks", "integer", "receive_upload", "safe_name"]

_CHUNK_SIZE = 64 * 1024

FlData = fl_round_pb2.FlData


def integer(value: int) -> FlData:
    return FlData(type=fl_round_pb2.FL_INT, intVal=value)


async def file_chunks(path: Path) -> AsyncIterator[FlData]:
    """``path`` as FL_FILES chunks with ``filePath`` set; the last one has ``isLastChunk``.

    Reads go through trio's worker threads: a model of a gigabyte, sent to
    many clients at once, never blocks the event loop. An empty file is one
    empty chunk, so the receiver still learns it exists.
    """
    async with await trio.open_file(path, "rb") as file:
        chunk = await file.read(_CHUNK_SIZE)
        while True:
            following = await file.read(_CHUNK_SIZE)
            yield FlData(
                type=fl_round_pb2.FL_FILES,
                chunk=chunk,
                filePath=path.name,
                isLastChunk=not following,
            )

            if not following:
                return
            chunk = following


def safe_name(file_path: str) -> str:
    """The base name of a received ``filePath``; refuse anything that is not a plain name."""
    name = Path(file_path.replace("\\", "/")).name
    if not name or name in (".", "..") or "\0" in name:
        raise ValueError(f"unusable file name {file_path!r}")
    return name


async def receive_upload(messages: AsyncIterator[FlData], dest: Path) -> int | None:
    """Write the FL_FILES chunks of an Update stream to ``dest``; return its FL_INT (or None)."""
    weight: int | None = None
    async with await trio.open_file(dest, "wb") as file:
        async for message in messages:
            if message.type == fl_round_pb2.FL_INT:
                weight = message.intVal
            else:
                await file.write(message.chunk)
    return weight
