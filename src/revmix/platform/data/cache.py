"""Content-keyed tokenised-data cache: one entry per (rows' text, tokenizer, chat template, max_length, truncation).

Why content and not ids: a key built from ``item_id`` + direction (or a file's size and mtime) silently
reuses stale tokens after a row's text is edited in place. The key here hashes every canonical field of
every training row, in order, as the rows stream past (:class:`ContentKey`; a large local file read
lazily: the file's bytes, :meth:`ContentKey.update_file`), plus the tokenizer's own
content (its serialised vocabulary, merges and added tokens, not its path), its chat template, and the
length settings. Change any of them and the key changes, so the entry is rebuilt.

Layout under the cache root (``data.cache_dir`` or ``$REVMIX_CACHE/tokenised``)::

    <root>/<key>/meta.json                  counts of the preparation (rows, truncated, dropped, rejected)
    <root>/<key>/<direction>/*.parquet      tokenised rows (columns: TOKENISED_COLUMNS)
    <root>/<key>/<direction>/_done          written last inside the entry (readers may check for it)
    <root>/builds.log                       one line per entry built (key, pid, time): a real count
    <root>/.<key>.lock                      the entry's lock file (fcntl.flock; empty)

An entry is built in ``<root>/.<key>.<hex>.tmp`` and renamed to ``<root>/<key>`` whole, under an exclusive
``flock`` on the lock file: a concurrent builder of the same key waits for the lock, then finds the entry
and reuses it, so two runs sharing a cache never write two copies. A killed build leaves only a temporary
folder, which the next builder of that key removes (it holds the lock, so nobody else is writing it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from revmix.atomic import atomic_write, fsync_dir
from revmix.platform.data.schema import ALL_FIELDS


def cache_root() -> Path:
    """The root of every per-node cache (tokenised data, reference log-probs, file digests, tiny models'
    pretrained bases): ``$REVMIX_CACHE``, else ``~/.cache/revmix``."""
    return Path(os.environ.get("REVMIX_CACHE", Path.home() / ".cache" / "revmix"))


CACHE_DONE = "_done"  # in an entry's direction folder: written last, the folder is complete
META = "meta.json"
BUILDS_LOG = "builds.log"
KEY_VERSION = 2  # bump when the tokenised columns or their meaning change


class ContentKey:
    """A SHA-256 over canonical rows fed one at a time, then the tokenisation settings.

    Streaming: :meth:`update` takes one row and keeps nothing but the hash state, so a key over 10M rows
    costs no memory. Every canonical field takes part (editing an answer changes the tokenised ``answer``
    column too); rows are hashed in order, since order decides ``row_index``.
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256(f"revmix.tokenised/v{KEY_VERSION}\n".encode())
        self.rows = 0

    def update(self, row: dict[str, Any]) -> None:
        values = [None if row.get(f) is None else str(row[f]) for f in ALL_FIELDS]
        self._h.update(json.dumps(values, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
        self.rows += 1

    def update_file(self, path: Path, rows: int) -> None:
        """The bytes of a whole source file, ``rows`` counting as its rows (the lazy reader's key): any
        edit to the file changes the key, and reading it costs a hash of its bytes (about 0.2 s for
        100 MB), far less than parsing it, so a reused entry is found without parsing a row."""
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                self._h.update(chunk)
        self.rows += rows

    def finish(
        self,
        tokenizer_identity: str,
        chat_template: str,
        max_length: int,
        truncation: str,
        skip_invalid: bool,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """The key: the rows' hash with the tokenizer, chat template and length settings (32 hex).

        ``skip_invalid`` takes part because it decides whether a prompt too long for ``max_length`` is left
        out (and counted) or fails the preparation: an entry built with it must not satisfy a run without.
        """
        h = self._h.copy()
        settings = {
            "rows": self.rows,
            "tokenizer": tokenizer_identity,
            "chat_template": chat_template,
            "max_length": max_length,
            "truncation": truncation,
            "skip_invalid": skip_invalid,
        }
        if extra:  # settings beyond tokenisation that decide the rows (the lazy reader's split, checks)
            settings["extra"] = extra
        h.update(json.dumps(settings, sort_keys=True).encode())
        return h.hexdigest()[:32]


def tokenizer_identity(tokenizer: Any) -> str:
    """A hash of what the tokenizer does, not where it lives: its serialised ``tokenizers`` model
    (vocabulary, merges, normaliser, added tokens) and its eos / pad ids (``load_tokenizer`` may set pad).

    The chat template is kept apart (:func:`chat_template_of`) so that the key names it separately.
    """
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(f"\0eos={tokenizer.eos_token_id}\0pad={tokenizer.pad_token_id}".encode())
    return h.hexdigest()[:32]


def chat_template_of(tokenizer: Any) -> str:
    """The chat template string the prompts are rendered with (empty when the tokenizer has none)."""
    template = tokenizer.chat_template
    return template if isinstance(template, str) else json.dumps(template, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------------
# Building an entry once
# --------------------------------------------------------------------------------------------------


def entry_complete(entry: Path) -> bool:
    """An entry is complete when its meta file is there: it is renamed into place whole."""
    return (entry / META).is_file()


def read_meta(entry: Path) -> dict[str, Any]:
    return dict(json.loads((entry / META).read_text()))


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path``; blocks while another process holds it. The kernel drops
    the lock when its holder dies, so a killed builder never leaves the key locked."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def build_once(root: Path, key: str, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, bool]:
    """``(entry, built)``: the complete entry ``root/key``, built now by ``build(tmp)`` unless it exists.

    ``build`` fills an empty temporary folder and returns the meta to store; if it raises, the temporary
    folder is removed and nothing is left behind. Under the key's lock, so concurrent callers build once.
    """
    if not key or any(c in key for c in "/\\\0."):
        raise ValueError(f"cache key must be a non-empty file-name-safe string, got {key!r}")
    entry = root / key
    if entry_complete(entry):
        return entry, False
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{key}.lock"):
        if entry_complete(entry):  # another process built it while this one waited for the lock
            return entry, False
        _remove_leftovers(root, key)
        tmp = root / f".{key}.{secrets.token_hex(4)}.tmp"
        tmp.mkdir()
        try:
            meta = build(tmp)
            atomic_write(tmp / META, json.dumps(meta, indent=1))
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(root)
        with open(root / BUILDS_LOG, "a", encoding="utf-8") as log:
            log.write(json.dumps({"key": key, "pid": os.getpid(), "time": time.time()}) + "\n")
    return entry, True


def _remove_leftovers(root: Path, key: str) -> None:
    """Temporary folders of killed builds of ``key``, and an entry without its meta (never renamed into
    place by this module, so a partial copy made by hand): the caller holds the key's lock."""
    for stale in root.glob(f".{key}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    entry = root / key
    if entry.is_dir() and not entry_complete(entry):
        raise FileExistsError(
            f"{entry} exists but holds no {META}: it was not written by revmix's cache (which renames an "
            f"entry into place whole); move it away or set data.cache_dir to another folder"
        )


def builds(root: Path) -> list[dict[str, Any]]:
    """Every build recorded in ``root/builds.log`` (the sweep test counts preparations with it)."""
    log = root / BUILDS_LOG
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# The tokenised rows of an entry
# --------------------------------------------------------------------------------------------------


def tokenised_schema() -> Any:
    """The Arrow schema of a direction's Parquet files: :data:`TOKENISED_COLUMNS`, typed, so the in-process
    writer and the Ray Data writer produce files a reader cannot tell apart."""
    import pyarrow as pa

    ids = pa.list_(pa.int64())
    return pa.schema(
        [
            ("row_index", pa.int64()),
            ("item_id", pa.string()),
            ("direction", pa.int64()),
            ("task", pa.string()),
            ("answer", pa.string()),
            ("prompt_ids", ids),
            ("response_ids", ids),
            ("other_ids", ids),
        ]
    )


def write_direction(folder: Path, rows: list[dict[str, Any]]) -> None:
    """One Parquet file of tokenised rows (an empty one, with the schema, when there are none), then
    the ``_done`` marker."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=tokenised_schema()), folder / "part-00000.parquet")
    (folder / CACHE_DONE).touch()


def read_direction(folder: Path) -> list[dict[str, Any]]:
    """Every tokenised row of a direction folder, in ``row_index`` order (the small, materialised path)."""
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f, schema=tokenised_schema()).to_pylist()]
    return sorted(rows, key=lambda r: r["row_index"])


class TokenisedRows(Sequence[dict[str, Any]]):
    """A direction's tokenised rows left on disk: ``len`` reads the Parquet footers only; indexing or
    iterating materialises the rows (in ``row_index`` order) on first use. Streaming consumers read the
    folder (:attr:`folder`) with Ray Data instead and never touch the rows here."""

    def __init__(self, folder: Path) -> None:
        import pyarrow.parquet as pq

        self.folder = folder
        self._len = sum(pq.ParquetFile(f).metadata.num_rows for f in folder.glob("*.parquet"))
        self._rows: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return self._len

    def _all(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = read_direction(self.folder)
        return self._rows

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, i: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        return self._all()[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._all())
