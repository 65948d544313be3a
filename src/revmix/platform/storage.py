"""Where a run or a sweep keeps its files: a local/NFS folder or a bucket (``s3://``, ``gs://``, ...).

A :class:`Store` is one root folder on one ``pyarrow.fs`` file system, addressed by paths relative to
that root ("stages/0/result.json"). ``pyarrow.fs`` rather than fsspec/s3fs: it is already a dependency,
it is what Ray Train and Tune use for their own ``storage_path`` (the same :class:`Store` hands Ray its
``storage_filesystem``, so revmix's files and Ray's sit side by side under one root with one set of
credentials), and its S3 client reads the standard AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` for an S3-compatible server) or an instance profile. A :class:`Store` pickles with
its file system, so Ray workers use the driver's endpoint and keys (:func:`s3_options`).

Libraries that need a local path (HF ``save_pretrained``/``from_pretrained``, torch, safetensors) work in
a local folder; :meth:`Store.upload` and :meth:`Store.download` move files between it and the store. On a
local store those are no-ops where source and target are the same folder.

Atomicity: on a local folder a text write goes to a temporary name and is renamed
(:func:`revmix.atomic.atomic_write`); an object store has no rename, but an object appears whole or not
at all when its upload completes, which is the same guarantee for one file.

``REVMIX_STORAGE`` (set on cluster nodes, ``configs/cluster/*.yaml``) is the root a relative ``--out``
name goes under: ``--out sweep1`` with ``REVMIX_STORAGE=s3://bucket/revmix`` is
``s3://bucket/revmix/sweep1``. Absolute paths, ``./``/``../``/``~`` paths and URIs are used as given.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from revmix.atomic import atomic_write

STORAGE_ENV = "REVMIX_STORAGE"


class StorageError(RuntimeError):
    """A store cannot be opened or used as asked (bad URI, missing bucket, no credentials)."""


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def resolve_location(location: str | Path) -> str:
    """``--out`` as the store it names: a URI, an absolute local path, or a name under ``REVMIX_STORAGE``."""
    text = str(location)
    if is_uri(text):
        return text.rstrip("/")
    root = os.environ.get(STORAGE_ENV, "").strip()
    explicit_local = text.startswith((".", "~", "/")) or os.path.isabs(text)
    if root and not explicit_local:
        return f"{root.rstrip('/')}/{text}" if is_uri(root) else str(Path(root).expanduser() / text)
    return str(Path(text).expanduser().absolute())


class Store:
    """One folder on one file system; every method takes a path relative to it ("" is the folder)."""

    def __init__(self, location: str | Path) -> None:
        self.uri = resolve_location(location)
        try:
            if self.uri.startswith("s3://") and "?" not in self.uri:
                self.fs, self.root = pafs.S3FileSystem(**s3_options()), self.uri[len("s3://") :]
            elif is_uri(self.uri):
                self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
            else:
                self.fs, self.root = pafs.LocalFileSystem(), self.uri
        except (OSError, ValueError) as e:
            raise StorageError(f"cannot open storage {self.uri!r}: {e}") from None
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    # ----------------------------------------------------------------------------------- addressing

    def path(self, rel: str = "") -> str:
        """The file system path of ``rel`` (what ``self.fs`` takes)."""
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        """``rel`` as a location a user (or :class:`Store`) can open: a URI or a local path."""
        return f"{self.uri}/{rel}" if rel else self.uri

    def local_path(self, rel: str = "") -> Path:
        """``rel`` on local disk; only for a local store."""
        if not self.is_local:
            raise StorageError(f"{self.url(rel)} is not on local disk")
        return Path(self.path(rel))

    def child(self, rel: str) -> Store:
        sub = Store.__new__(Store)
        sub.uri, sub.fs, sub.root, sub.is_local = self.url(rel), self.fs, self.path(rel), self.is_local
        return sub

    def check_reachable(self) -> None:
        """Raise :class:`StorageError` naming the location when its bucket does not exist or cannot be
        reached (before anything is written there); a local folder is created when first written."""
        if self.is_local:
            return
        bucket = self.root.split("/", 1)[0]
        try:
            found = self.fs.get_file_info(bucket).type == pafs.FileType.Directory
        except OSError as e:
            raise StorageError(f"cannot reach {self.uri}: {e}") from None
        if not found:
            raise StorageError(
                f"{self.uri}: bucket {bucket!r} does not exist (or these credentials cannot see it); "
                "create it first, revmix does not create buckets. Nothing was written"
            )

    # ----------------------------------------------------------------------------------- reading

    def _info(self, rel: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path(rel))
        except OSError as e:
            raise StorageError(f"cannot reach {self.url(rel)}: {e}") from None

    def exists(self, rel: str = "") -> bool:
        return self._info(rel).type != pafs.FileType.NotFound

    def is_dir(self, rel: str = "") -> bool:
        return self._info(rel).type == pafs.FileType.Directory

    def is_file(self, rel: str) -> bool:
        return self._info(rel).type == pafs.FileType.File

    def size(self, rel: str) -> int | None:
        """The size of a file in bytes; None when there is no file."""
        info = self._info(rel)
        return info.size if info.type == pafs.FileType.File else None

    def read_bytes(self, rel: str) -> bytes:
        """The file's content; ``FileNotFoundError`` (naming its location) when there is none."""
        if not self.is_file(rel):
            raise FileNotFoundError(f"{self.url(rel)}: no such file")
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def listdir(self, rel: str = "") -> list[str]:
        """Names of the entries directly in ``rel`` (sorted; empty when it is no folder)."""
        if not self.is_dir(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def walk(self, rel: str = "") -> list[str]:
        """Every file under ``rel``, as paths relative to ``rel`` (sorted)."""
        if not self.is_dir(rel):
            return []
        base = self.path(rel).rstrip("/") + "/"
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True))
        return sorted(i.path[len(base) :] for i in infos if i.type == pafs.FileType.File)

    # ----------------------------------------------------------------------------------- writing

    def write(self, rel: str, data: str | bytes) -> None:
        """Replace the file ``rel`` whole (see the module docstring for what "atomic" means where)."""
        raw = data.encode("utf-8") if isinstance(data, str) else data
        if self.is_local:
            target = self.local_path(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, raw)
            return
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(raw)

    def append_text(self, rel: str, text: str) -> None:
        """Add ``text`` to the end of ``rel``: read and rewrite on object stores (small files only)."""
        old = self.read_bytes(rel) if self.is_file(rel) else b""
        self.write(rel, old + text.encode("utf-8"))

    def delete_file(self, rel: str) -> None:
        if self.is_file(rel):
            self.fs.delete_file(self.path(rel))

    def delete_tree(self, rel: str) -> None:
        """Remove the folder ``rel`` and all it holds; callers pass only folders the platform created."""
        if not rel:
            raise StorageError(f"refusing to delete the whole store {self.uri}")
        if self.is_dir(rel):
            self.fs.delete_dir(self.path(rel))

    def upload(self, local: str | Path, rel: str, last: tuple[str, ...] = ()) -> None:
        """Copy the local file or folder ``local`` to ``rel``; in a folder, the names in ``last`` go last
        (a marker written last still proves the rest arrived)."""
        local = Path(local)
        if self.is_local and local.absolute() == self.local_path(rel).absolute():
            return
        if local.is_file():
            self._put(local, rel)
            return
        files = sorted(p for p in local.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name in last)
        for p in files:
            self._put(p, posixpath.join(rel, p.relative_to(local).as_posix()))

    def _put(self, local: Path, rel: str) -> None:
        self.fs.create_dir(posixpath.dirname(self.path(rel)), recursive=True)
        pafs.copy_files(str(local), self.path(rel), destination_filesystem=self.fs)

    def download(self, rel: str, local: str | Path) -> Path:
        """Copy the file or folder ``rel`` to the local ``local`` (replacing a file there); returns it."""
        local = Path(local)
        if self.is_local and self.local_path(rel).absolute() == local.absolute():
            return local
        if self.is_file(rel):
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(self.read_bytes(rel))
            return local
        if not self.is_dir(rel):
            raise FileNotFoundError(f"{self.url(rel)}: no such file or folder")
        for name in self.walk(rel):
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(posixpath.join(rel, name)))
        return local

    # ----------------------------------------------------------------------------------- Ray

    def ray_storage(self, rel: str) -> dict[str, Any]:
        """``storage_path`` (and ``storage_filesystem`` off local disk) for Ray's ``RunConfig``."""
        if self.is_local:
            return {"storage_path": self.path(rel)}
        return {"storage_path": self.path(rel), "storage_filesystem": self.fs}


def s3_options() -> dict[str, Any]:
    """The S3 client's settings from the standard AWS variables, made explicit so that the file system
    pickles with them: a Ray worker whose process lacks the variables reaches the same endpoint with the
    same keys (without keys in the environment each node falls back to its own instance profile)."""
    env = os.environ
    opts: dict[str, Any] = {}
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        opts.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])
        if env.get("AWS_SESSION_TOKEN"):
            opts["session_token"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        opts["region"] = region
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        opts.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme)
    return opts


def open_store(location: str | Path | Store) -> Store:
    """``--out`` as a store (a relative name goes under ``REVMIX_STORAGE``)."""
    return location if isinstance(location, Store) else Store(location)


def as_store(where: Path | Store) -> Store:
    """A store of a local folder the platform addresses by path (never redirected by ``REVMIX_STORAGE``)."""
    return where if isinstance(where, Store) else Store(Path(where).expanduser().absolute())


@contextlib.contextmanager
def local_copy(location: str | Path) -> Iterator[Path]:
    """A local path holding ``location``'s file or folder: itself when local, else a temporary download
    that is removed afterwards (e.g. a model or checkpoint on a bucket, for ``from_pretrained``)."""
    if not is_uri(location):
        yield Path(location)
        return
    tmp = Path(tempfile.mkdtemp(prefix="revmix-copy-"))
    try:
        store = Store(location)
        yield store.download("", tmp / (posixpath.basename(store.root) or "root"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def staging_dir(prefix: str) -> Path:
    """A new local folder for files on their way to a store (the caller removes it)."""
    return Path(tempfile.mkdtemp(prefix=f"revmix-{prefix}-"))
