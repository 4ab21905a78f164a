"""Atomic file writes: write a temporary file in the same directory, fsync, then rename.

A crash mid-write leaves either the old file or the new one, never a torn file, because
``os.replace`` within one directory is atomic on POSIX and Windows.

A write that fails (a full disk, a file-size limit) raises an OSError naming the file it was
writing (:func:`writing`), which the command-line tools print as one line.

A directory of files is written the same way (:func:`atomic_directory`): into a temporary
directory next to it, which takes its place only when every file is written.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors quotes the OS error it got


@contextmanager
def writing(path: str | Path):
    """Errors of the writes in the block name ``path``: an OSError that names no file (a failed
    ``write`` or ``fsync``), or a safetensors ``SafetensorError`` wrapping an OS error, is raised
    as ``OSError(errno, strerror, path)``: ``[Errno 28] No space left on device: 'path'``."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
    except SafetensorError as e:
        code = _OS_ERROR.search(str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``. A failed
    write names ``path`` (:func:`writing`) and leaves no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with writing(path):
            yield Path(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_directory(path: str | Path):
    """Yield a new, empty temporary directory next to ``path`` (``.<name>.<random>.partial``); when
    the block ends without error it takes the place of ``path``, a directory that is replaced (the
    caller decides that it may be) or absent. On an error the temporary directory is deleted and
    ``path`` is left as it was.

    The swap is two renames within one directory (``path`` aside, the new one in place), then the
    old one is deleted: a crash leaves ``path`` whole, old or new, or, between the two renames,
    absent with the old one kept in ``.<name>.<random>.old/<name>``. A killed process may leave its
    ``.partial`` directory behind, never a half-written ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.partial"
    tmp.mkdir()  # like mkdir would make ``path``: the umask's permissions
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
