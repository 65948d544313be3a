"""From a DataConfig to train rows per direction (tokenised once) and held-out canonical rows.

The driver does this once per experiment; stages and sweep trials reuse the result. With
``num_workers = 0`` the tokenised rows go to the in-process loop as lists; with Ray workers they become
per-direction Ray datasets (:func:`to_ray_datasets`), materialised when small and streamed from a
tokenised Parquet cache when large.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revmix.config import DataConfig
from revmix.platform.data.loaders import DataError, LoadReport
from revmix.platform.data.schema import DIRECTIONS, Direction
from revmix.platform.data.tokenize import fingerprint, tokenise_checked
from revmix.platform.data.validate import Problem, describe

CACHE_DONE = "_done"  # in a tokenised Parquet cache entry: written last, the entry is complete


@dataclass
class PreparedData:
    train: dict[str, list[dict[str, Any]]]  # direction -> tokenised rows
    test_rows: list[dict[str, Any]]  # canonical held-out rows (both directions)
    n_items: int  # training items (distinct item_id)
    # direction -> {"rows", "tokens"}: training rows over max_length whose responses were cut
    # (data.truncation=truncate), and the tokens cut
    truncated: dict[str, dict[str, int]] = field(default_factory=dict)
    # direction -> {"rows", "tokens"}: training rows over max_length left out (data.truncation=drop)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    rejected: int = 0  # rows skipped as invalid (only with data.skip_invalid)
    key: str = ""  # fingerprint of the tokenised training data
    meta: dict[str, Any] = field(default_factory=dict)

    def length_line(self, max_length: int, truncation: str) -> str:
        """One line: the training rows and tokens lost to ``max_length``, per direction."""
        parts = [
            f"{d} {self.truncated[d]['rows']} rows truncated ({self.truncated[d]['tokens']} tokens cut), "
            f"{self.dropped[d]['rows']} dropped ({self.dropped[d]['tokens']} tokens)"
            for d in DIRECTIONS
        ]
        return f"data: max_length {max_length}, truncation={truncation}: " + "; ".join(parts)


def cache_root() -> Path:
    return Path(os.environ.get("REVMIX_CACHE", Path.home() / ".cache" / "revmix"))


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
    """
    report = load_source(cfg)
    rows, origins = list(report.rows), list(report.origins)
    problems = _missing_pairs(rows, origins, pairs_needed_by)
    _raise_unless_skipped(problems, report, cfg.skip_invalid)
    bad = {(p.file, p.line) for p in problems}
    kept = [i for i, o in enumerate(origins) if o not in bad]
    rows, origins = [rows[i] for i in kept], [origins[i] for i in kept]
    origin_of = {id(r): o for r, o in zip(rows, origins)}  # the split keeps the row objects
    train, test = split_rows(rows, cfg)
    by_dir: dict[str, list[dict[str, Any]]] = {d: [] for d in DIRECTIONS}
    for r in train:
        by_dir[Direction.parse(r["direction"]).label].append(r)
    tokenised: dict[str, list[dict[str, Any]]] = {}
    truncated: dict[str, dict[str, int]] = {}
    dropped: dict[str, dict[str, int]] = {}
    start, too_long, over_length, left_out = 0, [], [], set()
    for d in DIRECTIONS:
        done = tokenise_checked(by_dir[d], tokenizer, cfg.max_length, start, cfg.truncation)
        tokenised[d] = done.rows
        truncated[d] = {"rows": done.truncated, "tokens": done.truncated_tokens}
        dropped[d] = {"rows": len(done.dropped), "tokens": done.dropped_tokens}
        too_long += [Problem(*origin_of[id(by_dir[d][i])], "prompt", why) for i, why in done.too_long]
        over_length += [Problem(*origin_of[id(by_dir[d][i])], "response", w) for i, w in done.over_length]
        left_out |= {id(by_dir[d][i]) for i, _ in done.too_long} | {id(by_dir[d][i]) for i in done.dropped}
        start += len(by_dir[d])
    if over_length:  # data.truncation=error: every row over max_length (and every long prompt) at once
        shown = over_length + ([] if cfg.skip_invalid else too_long)
        raise DataError(report.source, sorted(shown, key=_place), report.n_read)
    _raise_unless_skipped(sorted(too_long, key=_place), report, cfg.skip_invalid)
    train = [r for r in train if id(r) not in left_out]
    key = fingerprint((), [r["item_id"] + r["direction"] for r in train], tokenizer_id, cfg.max_length)
    data = PreparedData(
        train=tokenised,
        test_rows=test,
        n_items=len({r["item_id"] for r in train}),
        truncated=truncated,
        dropped=dropped,
        rejected=report.n_rejected + len(problems) + len(too_long),
        key=key,
    )
    print(data.length_line(cfg.max_length, cfg.truncation), flush=True)
    return data


def _place(problem: Problem) -> tuple[str, int]:
    return problem.file, problem.line


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


def _raise_unless_skipped(problems: list[Problem], report: LoadReport, skip_invalid: bool) -> None:
    if problems and not skip_invalid:
        raise DataError(report.source, problems, report.n_read)


def to_ray_datasets(data: PreparedData, cfg: DataConfig) -> dict[str, Any]:
    """Per-direction Ray datasets of tokenised rows: materialised, or a Parquet cache when large."""
    import ray.data

    out = {}
    for d, rows in data.train.items():
        if len(rows) > cfg.stream_threshold_rows:
            path = Path(cfg.cache_dir or cache_root() / "tokenised") / data.key / d
            if not (path / CACHE_DONE).exists():
                _write_parquet_cache(rows, path)
            out[d] = ray.data.read_parquet(str(path))
        else:
            out[d] = ray.data.from_items(rows).materialize()
    return out


def _write_parquet_cache(rows: list[dict[str, Any]], path: Path) -> None:
    """Fill the cache entry ``path`` whole or not at all: it is written under a temporary name and renamed
    once complete, so a killed write never leaves a partial entry that a later run would read."""
    import ray.data

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        ray.data.from_items(rows).write_parquet(str(tmp))
        (tmp / CACHE_DONE).touch()
        if path.is_dir() and all(p.suffix == ".parquet" for p in path.iterdir()):
            shutil.rmtree(path)  # an unfinished entry (Parquet parts, no marker) of an earlier write
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / CACHE_DONE).exists():
                raise
            # Another run finished the same entry first; both hold the same rows.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
