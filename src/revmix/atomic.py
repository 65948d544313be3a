"""Files that are either the old version or the complete new one, never half written.

A reader (``revmix report``, a resumed sweep, a user's pandas session) may open a results file while it is
being replaced, and a kill or a full disk may stop the writer at any byte. So every whole-file write goes
to a temporary name in the same folder (a rename is atomic only within one file system), is flushed to
disk, and is then renamed over the target; the folder is synced so the rename itself survives a crash.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` for a writer to fill; on success it replaces ``path``.

    On an exception the temporary file is removed and ``path`` keeps its old content. The temporary name
    starts with a dot and ends with ``.tmp`` so that globs over the folder do not pick it up.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_target(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; file systems that cannot sync a folder need not."""
    with contextlib.suppress(OSError):
        fsync_path(folder)
