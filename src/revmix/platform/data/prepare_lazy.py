"""Preparing a large local file without loading it: key pass, then (only if the entry is missing) build.

The driver's memory stays flat in the corpus size: the key pass hashes the file's bytes (no record
parsed); only when the entry is missing does the build scan (:func:`revmix.platform.data.lazy.scan`,
16 bytes a row) and spool (:func:`revmix.platform.data.lazy.spool`, one spool chunk of canonical rows,
the held-out rows and 8 bytes a training row); Ray Data tokenises the spool a block at a time into the
cache entry, and the training rows are then read lazily from there. The entry also keeps the held-out
canonical rows (``test.parquet``), so a reused entry needs no pass over the records at all.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from revmix.config import DataConfig
from revmix.platform.data import lazy
from revmix.platform.data.cache import (
    ContentKey,
    TokenisedRows,
    build_once,
    chat_template_of,
    read_meta,
    tokenizer_identity,
)
from revmix.platform.data.loaders import DataError, LoadReport
from revmix.platform.data.prepared import (
    PreparedData,
    losses_meta,
    raise_length_problems,
    tokenised_root,
)
from revmix.platform.data.schema import ALL_FIELDS, DIRECTIONS
from revmix.platform.data.validate import FILE, Problem

TEST_ROWS = "test.parquet"
READER = "lazy/1"  # in the key: the lazy reader splits by hash, so its entries differ from the loaded path's


def prepare_lazy(
    src: lazy.LazySource,
    n_counted: int,
    cfg: DataConfig,
    tokenizer: Any,
    tokenizer_id: str,
    pairs_needed_by: str | None,
) -> PreparedData:
    """:func:`revmix.platform.data.prepare.prepare_data` for a source of ``n_counted`` rows above the
    threshold: the training rows stay on disk (``streamed``), the held-out rows come back as a list."""
    key = _fingerprint(src, n_counted).finish(
        tokenizer_identity(tokenizer),
        chat_template_of(tokenizer),
        cfg.max_length,
        cfg.truncation,
        cfg.skip_invalid,
        extra={
            "reader": READER,
            "format": cfg.format,
            "columns": cfg.columns,
            "seed": cfg.seed,
            "test_fraction": cfg.test_fraction,
            "pairs_needed_by": pairs_needed_by,
            # only when set: the default keeps the keys (and cache entries) of the rows it always built
            **({"pairing": cfg.pairing} if cfg.pairing != "twins" else {}),
        },
    )

    def build(tmp: Path) -> dict[str, Any]:
        return _build(tmp, src, key, cfg, tokenizer, tokenizer_id, pairs_needed_by)

    entry, built = build_once(tokenised_root(cfg), key, build)
    meta = read_meta(entry)
    print(
        f"data: {n_counted} source rows > data.stream_threshold_rows {cfg.stream_threshold_rows} "
        f"({'Parquet footer' if src.path.suffix == '.parquet' else 'JSONL lines'}): read, validated and "
        f"split by item hash lazily, tokenised in Ray Data, streamed from Parquet; tokenised cache "
        f"{'built' if built else 'reused'}: {entry}",
        flush=True,
    )
    if cfg.pairing != "twins":
        print(
            f"data: pairing {cfg.pairing}: forward and reverse rows from disjoint item halves (hash of the item "
            f"id below or above 1/2); {meta['unpaired']} training rows left out",
            flush=True,
        )
    on_disk: dict[str, Any] = {d: TokenisedRows(entry / d) for d in DIRECTIONS}  # never materialised here
    data = PreparedData(
        train=on_disk,
        test_rows=_read_test_rows(entry / TEST_ROWS),
        n_items=int(meta["n_items"]),
        truncated=meta["truncated"],
        dropped=meta["dropped"],
        rejected=int(meta["rejected"]) + int(meta["too_long"]),
        key=key,
        entry=entry,
        streamed=True,
        meta={**meta, "cache": "built" if built else "reused"},
    )
    print(data.length_line(cfg.max_length, cfg.truncation), flush=True)
    return data


def _fingerprint(src: lazy.LazySource, n_counted: int) -> ContentKey:
    """The rows' part of the key: the source file's bytes (no record parsed, so a reused entry costs
    one hash of the file); a file that cannot be read is one problem naming it."""
    key = ContentKey()
    try:
        key.update_file(src.path, n_counted)
    except OSError as err:
        why = f"expected a readable row file, got {err}"
        raise DataError(src.label, [Problem(src.label, 1, FILE, why)], 0) from None
    return key


def _scan(src: lazy.LazySource) -> lazy.Scan:
    """The key pass; a source that cannot be read, or has no rows, is one problem naming it."""
    try:
        seen = lazy.scan(src)
    except (OSError, ValueError) as err:  # UnicodeDecodeError and pyarrow's ArrowInvalid are ValueErrors
        why = f"expected a readable row file, got {err}"
        raise DataError(src.label, [Problem(src.label, 1, FILE, why)], 0) from None
    if seen.n_read == 0:
        raise DataError(src.label, [Problem(src.label, 1, FILE, "expected at least one row, found none")], 0)
    return seen


def _build(
    tmp: Path,
    src: lazy.LazySource,
    key: str,
    cfg: DataConfig,
    tokenizer: Any,
    tokenizer_id: str,
    pairs_needed_by: str | None,
) -> dict[str, Any]:
    """The build pass into ``tmp``: validate and spool, tokenise each direction in Ray Data, keep the
    held-out rows; problems raise :class:`DataError` (listing every one) before the entry exists."""
    from revmix.platform.data.tokenise_ray import tokenise_spool_in_ray

    seen = _scan(src)
    spool_dir = tmp / ".spool"
    got = lazy.spool(src, seen, spool_dir, cfg.seed, cfg.test_fraction, pairs_needed_by, cfg.pairing)
    report = LoadReport([], got.problems, src.label, got.n_read)
    if got.problems and not cfg.skip_invalid:
        raise DataError(src.label, sorted(got.problems, key=lambda p: p.line), got.n_read)
    offset = {"forward": 0, "reverse": got.counts["forward"]}  # forward rows first, as the loaded path
    stats: dict[str, dict[str, Any]] = {
        d: tokenise_spool_in_ray(
            spool_dir / d, got.counts[d], tmp / d, tokenizer, cfg.max_length, cfg.truncation, offset[d]
        )
        for d in DIRECTIONS
    }
    shutil.rmtree(spool_dir, ignore_errors=True)
    raise_length_problems(stats, report, cfg.skip_invalid)
    _write_test_rows(tmp / TEST_ROWS, got.test_rows)
    left_out = [item for d in DIRECTIONS for item in stats[d]["left_out"]]
    return {
        "key": key,
        "source": src.label,
        "tokenizer": tokenizer_id,
        "tokenised_in": "ray_data",
        "reader": READER,
        "read": got.n_read,  # == rows + test_rows + rejected + too_long + left out for length + unpaired
        "unpaired": got.unpaired,  # training rows left out by data.pairing=independent
        "rows": {d: got.counts[d] - len(stats[d]["left_out"]) for d in DIRECTIONS},
        "test_rows": len(got.test_rows),
        "rejected": got.n_rejected,
        "n_items": lazy.training_items(got.item_hashes, left_out),
        **losses_meta(stats),
    }


def _write_test_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(f, pa.string()) for f in ALL_FIELDS])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _read_test_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return list(pq.read_table(path).to_pylist())
