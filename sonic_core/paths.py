"""What a path a user gave really is, for every path input (image, audio, models, SVD folder, state
folder, node file names): one rule, so no input calls a folder, a device, a FIFO or a symlink loop
"does not exist".

Nothing here opens the path: ``os.stat`` / ``os.lstat`` / ``os.access`` only, so a FIFO (named
pipe) never blocks and a device is never read.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

FILE, FOLDER = "file", "folder"


def describe_path(path: str | os.PathLike) -> tuple[str, str]:
    """``(kind, words)`` for ``path``: kind is one of ``file``, ``empty file``, ``folder``, ``missing``,
    ``dangling symlink``, ``symlink loop``, ``character device``, ``block device``, ``FIFO``,
    ``socket``, ``permission denied``, ``unreadable`` or ``other``; words say it in a sentence part
    ("is a folder", "is a symlink to /x, which does not exist", ...). Symlinks are followed."""
    p = os.fspath(path)
    try:
        st = os.stat(p)  # follows links; never opens (a FIFO does not block)
    except FileNotFoundError:
        if os.path.islink(p):
            return "dangling symlink", f"is a symlink to {os.readlink(p)}, which does not exist"
        parent = _missing_parent(p)
        if parent is not None:
            return "missing", f"does not exist ({parent} is not a folder)"
        return "missing", "does not exist"
    except NotADirectoryError:
        where = _missing_parent(p) or "a folder on its path"
        return "missing", f"does not exist ({where} is a file, not a folder)"
    except PermissionError:
        return "permission denied", ("cannot be looked at: permission denied on a folder on its path (give "
                                     "this user search permission there, or copy it somewhere readable)")
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop", "is a symlink loop (the link leads, directly or through others, to itself)"
        if e.errno == errno.ENAMETOOLONG:
            return "unreadable", "has a name too long for this system"
        return "unreadable", f"cannot be looked at ({e.strerror or e})"
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return FOLDER, "is a folder"
    if stat.S_ISREG(mode):
        if st.st_size == 0:
            return "empty file", ("is empty (0 bytes): an interrupted download or copy? Download or copy it "
                                  "again")
        return FILE, "is a file"
    if stat.S_ISCHR(mode):
        return "character device", "is a character device (like /dev/zero), not a regular file"
    if stat.S_ISBLK(mode):
        return "block device", "is a block device (a disk), not a regular file"
    if stat.S_ISFIFO(mode):
        return "FIFO", "is a FIFO (named pipe), not a regular file (not read: that would wait for a writer)"
    if stat.S_ISSOCK(mode):
        return "socket", "is a socket, not a regular file"
    return "other", "is not a regular file or a folder"


def _missing_parent(p: str) -> str | None:
    """The nearest existing ancestor of ``p`` when it is not a folder (a file in the way), else None."""
    parent = os.path.dirname(os.path.abspath(p))
    while parent and not os.path.lexists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    return parent if os.path.lexists(parent) and not os.path.isdir(parent) else None


def path_problem(path: str | os.PathLike, want: str = FILE,
                 allow_empty: bool = False) -> tuple[str, str] | None:
    """None when ``path`` is a readable ``want`` (``"file"`` or ``"folder"``); else ``(kind, words)``
    as ``describe_path`` says them, with ``kind`` ``"permission denied"`` for one this user cannot
    read (a folder: list and enter)."""
    kind, words = describe_path(path)
    if want == FOLDER and kind in (FILE, "empty file"):
        return kind, "is a file, not a folder"
    if want == FILE and kind == "empty file" and allow_empty:
        kind = FILE
    if kind != want:
        return kind, words
    mode = os.R_OK | (os.X_OK if want == FOLDER else 0)
    if not os.access(path, mode):
        return "permission denied", ("cannot be read: permission denied (give this user read permission, or "
                                     "copy it somewhere readable)")
    return None


_ERRORS = {"missing": FileNotFoundError, "dangling symlink": FileNotFoundError, FOLDER: IsADirectoryError,
           "permission denied": PermissionError}


def check_input(path: str | os.PathLike, what: str, want: str = FILE, fix: str = "",
                allow_empty: bool = False) -> Path:
    """``path`` as a Path when it is a readable ``want`` (file or folder), else an error that says
    what it really is: ``"{what} {path} {words}; {fix}"``. FileNotFoundError for a missing path or
    a dangling symlink, IsADirectoryError for a folder where a file is wanted, NotADirectoryError
    for a file where a folder is wanted, PermissionError, else ValueError (device, FIFO, socket,
    symlink loop, empty file). ``fix`` says what to give instead."""
    problem = path_problem(path, want, allow_empty)
    if problem is None:
        return Path(path)
    kind, words = problem
    cls = _ERRORS.get(kind, ValueError)
    if want == FOLDER and kind in (FILE, "empty file"):
        cls = NotADirectoryError
    message = f"{what} {os.fspath(path)} {words}" + (f"; {fix}" if fix else "")
    err = cls(message)  # one-argument form: str(err) is the message itself
    err.kind = kind  # the path's kind, for callers that react to it
    raise err


def optional_file(path: str | os.PathLike, what: str, fix: str = "") -> Path | None:
    """None when nothing is at ``path`` (an optional file, or one of several names tried); the path
    when it is a readable file; else ``check_input``'s error (a FIFO, a folder, a loop... at a
    file's place is said, not taken for "missing")."""
    if not os.path.lexists(path):
        return None
    return check_input(path, what, FILE, fix)
