"""How a command opens an arena, and the one kind of error the command line reports.

Every failure to open (no such segment, not a shmalloc arena, another layout version, no
permission, a header that fails validation) becomes one :class:`CliError` that says what was found;
the exit codes are those of the command line (see the package docstring).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

from .. import _binding as C
from ..attachment import own_arena_mode
from ..errors import CorruptionDetected, NotAnArena
from ..manager import MemoryManager, validate_name

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "SHM_DIR",
    "CliError",
    "attached",
    "open_arena",
    "read_header",
    "segment_path",
]

SHM_DIR = "/dev/shm"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A failure to report to a person: one line on stderr and ``code`` as the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def read_header(name: str) -> bytes | None:
    """The head of /dev/shm/NAME that the C core's probe reads, or None if it is gone.
    PermissionError when this user may not read it."""
    try:
        fd = os.open(segment_path(name), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, C.segment_probe_size())
    finally:
        os.close(fd)


def _identify(name: str) -> str:
    """Classify /dev/shm/NAME: ``arena``, ``formatting`` (magic not yet written), ``foreign`` or
    ``version`` (ours, another layout). CliError when it is missing or unreadable."""
    try:
        st = os.lstat(segment_path(name))
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        if stat.S_ISLNK(st.st_mode):
            what = "a symbolic link (links are never followed)"
        raise CliError(str(NotAnArena(name, f"it is {what}, not a shared-memory segment")))
    try:
        head = read_header(name)
    except PermissionError:
        raise _not_permitted(name) from None
    if head is None:
        raise CliError(f"no arena named {name!r} (see `shmalloc list`); create it first")
    kind = C.segment_probe(head)
    if kind == C.SEG_ARENA:
        return "arena"
    if kind == C.SEG_OTHER_VERSION:
        return "version"
    return "formatting" if kind == C.SEG_FORMATTING else "foreign"


def _not_permitted(name: str) -> CliError:
    return CliError(f"arena {name!r} exists but this user may not open it; {_owner_hint(name)}")


def _owner_hint(name: str) -> str:
    try:
        st = os.stat(segment_path(name))
    except OSError:
        return "run as the user who created it"
    return f"it belongs to uid {st.st_uid} with mode {st.st_mode & 0o777:04o}; run as that user"


def open_arena(name: str) -> MemoryManager:
    """Attach to the arena ``name`` for a command, turning every way that can fail into one
    CliError that says what was found."""
    try:
        validate_name(name)
    except ValueError as e:
        raise CliError(str(e)) from None
    kind = _identify(name)
    if kind == "foreign":
        raise CliError(
            f"{segment_path(name)} is not a shmalloc arena (its first bytes are not shmalloc's "
            "magic); leave it alone or pick another name"
        )
    if kind == "version":
        raise CliError(
            f"arena {name!r} was made by a shmalloc with another segment layout (this one reads "
            f"layout {C.layout_version()}); use the shmalloc version that created it"
        )
    try:
        return MemoryManager.attach(name, mode=own_arena_mode(name))
    except (FileNotFoundError, NotAnArena) as e:
        raise CliError(str(e)) from None
    except PermissionError as e:
        raise CliError(str(e)) from None
    except CorruptionDetected as e:
        raise CliError(f"arena {name!r} cannot be opened: {e}", EXIT_FAILED) from None


@contextlib.contextmanager
def attached(name: str) -> Iterator[MemoryManager]:
    mgr = open_arena(name)
    try:
        yield mgr
    finally:
        mgr.close()
