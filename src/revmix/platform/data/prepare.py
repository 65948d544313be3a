"""From a DataConfig to train rows per direction (tokenised once) and held-out canonical rows.

The driver does this once per experiment; stages, reruns and sweep trials with the same data reuse the
content-keyed tokenised cache entry (:mod:`revmix.platform.data.cache`). With ``num_workers = 0`` the
tokenised rows go to the in-process loop; with Ray workers they become per-direction Ray datasets
(:func:`to_ray_datasets`), materialised when small and read lazily from the entry's Parquet when large.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from revmix.config import DataConfig, ExperimentConfig
from revmix.platform.data.cache import (
    ContentKey,
    TokenisedRows,
    build_once,
    chat_template_of,
    read_direction,
    read_meta,
    tokenizer_identity,
    write_direction,
)
from revmix.platform.data.loaders import LoadReport
from revmix.platform.data.pairing import paired_rows, pairing_line
from revmix.platform.data.prepared import (
    PreparedData,
    losses_meta,
    raise_length_problems,
    raise_unless_skipped,
    tokenised_root,
)
from revmix.platform.data.schema import DIRECTIONS, Direction
from revmix.platform.data.tokenize import ORIGIN_FILE, ORIGIN_LINE, tokenise_chunk
from revmix.platform.data.validate import Problem, describe


def load_source(cfg: DataConfig) -> LoadReport:
    """All canonical rows of the configured source, where each was read, and the rejected ones."""
    if cfg.source == "synthetic":
        from revmix.platform.data.synthetic import generate_mix

        rows = generate_mix(list(cfg.families), cfg.n_items, seed=cfg.seed)
        origins = [("synthetic", i) for i in range(1, len(rows) + 1)]
        return LoadReport(rows, source="synthetic", n_read=len(rows), origins=origins)
    if cfg.format != "canonical" or cfg.columns or cfg.source.startswith("hf:"):
        from revmix.platform.data.formats import load_formatted

        return load_formatted(
            cfg.source,
            cfg.format,
            cfg.columns,
            split=cfg.split,
            config_name=cfg.config_name,
            skip_invalid=cfg.skip_invalid,
        )
    from revmix.platform.data.loaders import load_rows

    extra = {"n": cfg.n_items, "seed": cfg.seed} if cfg.source.startswith("synthetic:") else {}
    return load_rows(cfg.source, skip_invalid=cfg.skip_invalid, **extra)


def load_canonical_rows(cfg: DataConfig) -> tuple[list[dict[str, Any]], int]:
    """All canonical rows of the configured source, and how many were rejected (skip_invalid only)."""
    report = load_source(cfg)
    return list(report.rows), report.n_rejected


def split_rows(
    rows: list[dict[str, Any]], cfg: DataConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from revmix.platform.data.synthetic import split_by_item

    return split_by_item(rows, cfg.test_fraction, seed=cfg.seed)


def prepare_data(
    cfg: DataConfig, tokenizer: Any, tokenizer_id: str = "", *, pairs_needed_by: str | None = None
) -> PreparedData:
    """Load, check, split and tokenise the configured data; every problem names its ``FILE:LINE``.

    ``pairs_needed_by`` names what trains on (response, other_response) pairs (``stages.1.objective
    (dpo)``): then every row must have an ``other_response``. Rows whose prompt leaves no room for a
    response within ``max_length`` are problems too. Problems raise :class:`DataError`, or, with
    ``data.skip_invalid``, leave their rows out and count them in ``rejected``. Training rows over
    ``max_length`` follow ``data.truncation`` (cut, dropped, or a :class:`DataError` naming each row and its
    lengths — raised even with ``skip_invalid``: leaving such rows out is what ``drop`` is for); rows and
    tokens lost per direction are printed in one line and kept in ``truncated`` / ``dropped``.

    The tokenised rows live in a content-keyed cache entry (:mod:`revmix.platform.data.cache`): built
    once — in this process when there are at most ``data.stream_threshold_rows`` training rows, else in
    Ray Data — and reused by every later call with the same rows, tokenizer, chat template and length
    settings. ``tokenizer_id`` (the tokenizer's path) is recorded in the entry for people, not keyed on.

    A local ``.jsonl`` / ``.parquet`` source with more than ``data.stream_threshold_rows`` rows (counted
    from the Parquet footer or the JSONL newlines) is never loaded whole: it is read, validated, split by
    item hash and tokenised a chunk at a time (:mod:`revmix.platform.data.prepare_lazy`).
    """
    from revmix.platform.data.lazy import lazy_source

    src = lazy_source(cfg.source, cfg.format, cfg.columns)
    n_source = _count_or_zero(src.path) if src is not None else 0
    if src is not None and n_source > cfg.stream_threshold_rows:
        from revmix.platform.data.prepare_lazy import prepare_lazy

        return prepare_lazy(src, n_source, cfg, tokenizer, tokenizer_id, pairs_needed_by)
    return _prepare_loaded(cfg, tokenizer, tokenizer_id, pairs_needed_by)


def _count_or_zero(path: Path) -> int:
    """The source's row count for the switch; 0 for a file that cannot be counted (not Parquet, say),
    which the loaded path then names as unreadable."""
    from revmix.platform.data.lazy import count_rows

    try:
        return count_rows(path)
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        return 0


def _prepare_loaded(
    cfg: DataConfig, tokenizer: Any, tokenizer_id: str, pairs_needed_by: str | None
) -> PreparedData:
    """:func:`prepare_data` with the source loaded whole (small files, synthetic, ``hf:`` and the rest)."""
    report = load_source(cfg)
    rows, origins = list(report.rows), list(report.origins)
    problems = _missing_pairs(rows, origins, pairs_needed_by)
    raise_unless_skipped(problems, report, cfg.skip_invalid)
    bad = {(p.file, p.line) for p in problems}
    kept = [i for i, o in enumerate(origins) if o not in bad]
    rows, origins = [rows[i] for i in kept], [origins[i] for i in kept]
    origin_of = {id(r): o for r, o in zip(rows, origins)}  # the split keeps the row objects
    train, test = split_rows(rows, cfg)
    paired = paired_rows(train, cfg.pairing, cfg.seed)
    if (line := pairing_line(len(train), paired, cfg.pairing)) is not None:
        print(line, flush=True)
    by_dir = _numbered_by_direction(paired, origin_of)
    key = _content_key(by_dir, tokenizer, cfg)
    n_rows = sum(len(v) for v in by_dir.values())
    streamed = n_rows > cfg.stream_threshold_rows
    fresh: dict[str, list[dict[str, Any]]] = {}

    def build(tmp: Path) -> dict[str, Any]:
        stats = _tokenise_into(tmp, by_dir, tokenizer, cfg, streamed, fresh)
        raise_length_problems(stats, report, cfg.skip_invalid)
        return _entry_meta(key, stats, by_dir, report.source, tokenizer_id, streamed)

    entry, built = build_once(tokenised_root(cfg), key, build)
    meta = read_meta(entry)
    print(_path_line(n_rows, cfg.stream_threshold_rows, streamed, built, entry), flush=True)
    data = PreparedData(
        train=_train_rows(entry, fresh, streamed),
        test_rows=test,
        n_items=int(meta["n_items"]),
        truncated=meta["truncated"],
        dropped=meta["dropped"],
        rejected=report.n_rejected + len(problems) + int(meta["too_long"]),
        key=key,
        entry=entry,
        streamed=streamed,
        meta={**meta, "cache": "built" if built else "reused"},
    )
    print(data.length_line(cfg.max_length, cfg.truncation), flush=True)
    return data


def _numbered_by_direction(
    train: list[dict[str, Any]], origin_of: dict[int, tuple[str, int]]
) -> dict[str, list[dict[str, Any]]]:
    """Training rows per direction, each a copy carrying its ``row_index`` (forward rows first, in source
    order, then reverse rows) and where it was read (``_file``, ``_line``) for problems."""
    by_dir: dict[str, list[dict[str, Any]]] = {d: [] for d in DIRECTIONS}
    for r in train:
        by_dir[Direction.parse(r["direction"]).label].append(r)
    index = 0
    for d in DIRECTIONS:
        numbered = []
        for r in by_dir[d]:
            file, line = origin_of[id(r)]
            numbered.append({**r, "row_index": index, ORIGIN_FILE: file, ORIGIN_LINE: line})
            index += 1
        by_dir[d] = numbered
    return by_dir


def _content_key(by_dir: dict[str, list[dict[str, Any]]], tokenizer: Any, cfg: DataConfig) -> str:
    key = ContentKey()
    for d in DIRECTIONS:
        for r in by_dir[d]:
            key.update(r)
    return key.finish(
        tokenizer_identity(tokenizer),
        chat_template_of(tokenizer),
        cfg.max_length,
        cfg.truncation,
        cfg.skip_invalid,
    )


def _tokenise_into(
    tmp: Path,
    by_dir: dict[str, list[dict[str, Any]]],
    tokenizer: Any,
    cfg: DataConfig,
    streamed: bool,
    fresh: dict[str, list[dict[str, Any]]],
) -> dict[str, dict[str, Any]]:
    """Every direction's tokenised rows into ``tmp/<direction>/``; returns the stats per direction. In
    process, the tokenised rows are also kept in ``fresh`` (no need to read back what was just written)."""
    stats: dict[str, dict[str, Any]] = {}
    for d in DIRECTIONS:
        if streamed:
            from revmix.platform.data.tokenise_ray import tokenise_direction_in_ray

            stats[d] = tokenise_direction_in_ray(
                by_dir[d], tmp / d, tokenizer, cfg.max_length, cfg.truncation
            )
        else:
            fresh[d], stats[d] = tokenise_chunk(by_dir[d], tokenizer, cfg.max_length, cfg.truncation)
            write_direction(tmp / d, fresh[d])
    return stats


def _entry_meta(
    key: str,
    stats: dict[str, dict[str, Any]],
    by_dir: dict[str, list[dict[str, Any]]],
    source: str,
    tokenizer_id: str,
    streamed: bool,
) -> dict[str, Any]:
    """What a later run needs without re-reading the rows: counts per direction and training items."""
    rows_of_item = Counter(r["item_id"] for d in DIRECTIONS for r in by_dir[d])
    rows_of_item.subtract(item for d in DIRECTIONS for item in stats[d]["left_out"])
    return {
        "key": key,
        "source": source,
        "tokenizer": tokenizer_id,
        "tokenised_in": "ray_data" if streamed else "process",
        "rows": {d: len(by_dir[d]) - len(stats[d]["left_out"]) for d in DIRECTIONS},
        "n_items": sum(1 for n in rows_of_item.values() if n > 0),
        **losses_meta(stats),
    }


def _train_rows(entry: Path, fresh: dict[str, list[dict[str, Any]]], streamed: bool) -> dict[str, Any]:
    """The tokenised rows per direction: just tokenised (in memory), read back (small), or left on disk."""
    if fresh:
        return fresh
    if streamed:
        return {d: TokenisedRows(entry / d) for d in DIRECTIONS}
    return {d: read_direction(entry / d) for d in DIRECTIONS}


def _path_line(n_rows: int, threshold: int, streamed: bool, built: bool, entry: Path) -> str:
    """One line: which path the training rows took, why, and whether the cache entry was built or reused."""
    if streamed:
        how = f"{n_rows} training rows > data.stream_threshold_rows {threshold}: tokenised in Ray Data, streamed from Parquet"
    else:
        how = f"{n_rows} training rows <= data.stream_threshold_rows {threshold}: tokenised in this process, materialised"
    return f"data: {how}; tokenised cache {'built' if built else 'reused'}: {entry}"


def _missing_pairs(
    rows: list[dict[str, Any]], origins: list[tuple[str, int]], needed_by: str | None
) -> list[Problem]:
    """A problem for every row without the ``other_response`` a pair objective trains on."""
    if needed_by is None:
        return []
    return [
        Problem(
            file,
            line,
            "other_response",
            f"expected a non-empty string ({needed_by} trains on response/other_response pairs), "
            f"got {describe(row.get('other_response'))}",
        )
        for row, (file, line) in zip(rows, origins)
        if not (isinstance(row.get("other_response"), str) and row["other_response"].strip())
    ]


def to_ray_datasets(data: PreparedData, cfg: DataConfig) -> dict[str, Any]:
    """Per-direction Ray datasets of tokenised rows: materialised when small, read lazily from the cache
    entry's Parquet files when large. The switch was made (and printed) by :func:`prepare_data`;
    ``cfg`` stays in the signature for the callers that pass it."""
    import ray.data

    if data.streamed:
        assert data.entry is not None  # prepare_data always writes the entry
        return {d: ray.data.read_parquet(str(data.entry / d)) for d in DIRECTIONS}
    return {d: ray.data.from_items(list(rows)).materialize() for d, rows in data.train.items()}


def pairs_needed_by(cfg: ExperimentConfig) -> str | None:
    """The first stage whose objective trains on (response, other_response) pairs, as a config path."""
    for i, stage in enumerate(cfg.stages):
        if "other_response" in stage.objective.requires:
            return f"stages.{i}.objective ({stage.objective.name})"
    return None


def prepare_experiment_data(cfg: ExperimentConfig) -> tuple[str, Any, PreparedData]:
    """``(model path, tokenizer, prepared data)`` of an experiment: what its driver tokenises with, and
    what a sweep's driver prepares ahead of its trials (the same call, so the same cache key)."""
    from revmix.platform.models import load_tokenizer
    from revmix.platform.pretrain import base_model_path

    model_path = base_model_path(cfg.model.name_or_path, cfg.model.scale, cfg.model.init_seed, cfg.model.base)
    tokenizer = load_tokenizer(model_path)
    data = prepare_data(cfg.data, tokenizer, tokenizer_id=model_path, pairs_needed_by=pairs_needed_by(cfg))
    return model_path, tokenizer, data
