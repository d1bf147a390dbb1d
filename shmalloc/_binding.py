"""The only importer of the compiled C core: maps its status codes to exceptions, in one place."""

from __future__ import annotations

from typing import NoReturn

from ._native import ffi, lib
from .errors import (
    AlignmentError,
    CorruptionDetected,
    InvalidAddress,
    OutOfMemory,
    ProcessLimitExceeded,
    ProtectionViolation,
    ShmallocError,
)

__all__ = ["ffi", "lib", "raise_status", "last_detail"]


def last_detail() -> str:
    """What the C core recorded about this thread's last failure."""
    return ffi.string(lib.shm_last_error().detail).decode("utf-8", "replace")


def raise_status(status: int, address: int = 0) -> NoReturn:
    """Raise the exception for a negative status returned by the C core."""
    e = lib.shm_last_error()
    detail = last_detail()
    if status in (lib.SHM_ENOMEM, lib.SHM_ENOSPC):
        raise OutOfMemory(int(e.requested), int(e.available), int(e.used), int(e.total), detail)
    if status == lib.SHM_EADDR:
        raise InvalidAddress(address, detail)
    if status in (lib.SHM_ECORRUPT, lib.SHM_ELAYOUT, lib.SHM_ENOTARENA):
        raise CorruptionDetected(int(e.offset), detail)
    if status == lib.SHM_EALIGN:
        raise AlignmentError(int(e.offset))
    if status == lib.SHM_EPROTECT:
        raise ProtectionViolation(address)
    if status == lib.SHM_ELIMIT:
        raise ProcessLimitExceeded(int(e.pid), int(e.limit), int(e.used), int(e.requested))
    if status == lib.SHM_EINVAL:
        raise ValueError(detail)
    if status == lib.SHM_ESYS:
        raise OSError(int(e.sys_errno), detail)
    if status == lib.SHM_EPROCS:
        raise ShmallocError(detail)
    raise ShmallocError(f"status {status}: {ffi.string(lib.shm_strerror(status)).decode()}")
