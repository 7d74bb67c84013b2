"""Exchange two paths atomically: Linux's ``renameat2(2)`` with ``RENAME_EXCHANGE``.

Replacing a whole folder that already exists cannot be done with
``os.replace`` (a folder is only renamed over an empty one), and renaming the
old one away first leaves a moment with no folder at all. ``RENAME_EXCHANGE``
swaps the two names in one step (Linux 3.15; ext4, xfs, btrfs, tmpfs). Python
has no wrapper for it, so it is called through ``ctypes``; where the C
library or the file system lacks it (NFS answers EINVAL) :func:`exchange`
raises :class:`NotSupported` and the caller falls back to something weaker.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

__all__ = ["NotSupported", "exchange"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


class NotSupported(OSError):
    """This system or file system cannot exchange two paths atomically."""


def exchange(first: Path, second: Path) -> None:
    """Swap ``first`` and ``second`` (both must exist) in one atomic step."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        raise NotSupported(errno.ENOSYS, "renameat2 is not in this C library") from None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result != 0:
        code = ctypes.get_errno()
        kind = NotSupported if code in _UNSUPPORTED else OSError
        raise kind(code, os.strerror(code), str(first), None, str(second))
