"""What data preparation hands on, shared by the loaded path (:mod:`revmix.platform.data.prepare`) and the
lazy one (:mod:`revmix.platform.data.prepare_lazy`): the prepared data, where the tokenised entries live,
the rows and tokens lost to ``max_length``, and how length problems are raised."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revmix.config import DataConfig
from revmix.platform.data.cache import cache_root
from revmix.platform.data.loaders import DataError, LoadReport
from revmix.platform.data.schema import DIRECTIONS
from revmix.platform.data.validate import Problem


@dataclass
class PreparedData:
    train: dict[
        str, list[dict[str, Any]]
    ]  # direction -> tokenised rows (TokenisedRows, on disk, if streamed)
    test_rows: list[dict[str, Any]]  # canonical held-out rows (both directions)
    n_items: int  # training items (distinct item_id)
    # direction -> {"rows", "tokens"}: training rows over max_length whose responses were cut
    # (data.truncation=truncate), and the tokens cut
    truncated: dict[str, dict[str, int]] = field(default_factory=dict)
    # direction -> {"rows", "tokens"}: training rows over max_length left out (data.truncation=drop)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    rejected: int = 0  # rows skipped as invalid (only with data.skip_invalid)
    key: str = ""  # content key of the tokenised training data (revmix.platform.data.cache)
    entry: Path | None = None  # the cache entry: <root>/<key>/<direction>/*.parquet
    streamed: bool = False  # above data.stream_threshold_rows: read the entry lazily, never as lists
    meta: dict[str, Any] = field(default_factory=dict)  # the entry's meta.json, plus cache: built|reused

    def length_line(self, max_length: int, truncation: str) -> str:
        """One line: the training rows and tokens lost to ``max_length``, per direction."""
        parts = [
            f"{d} {self.truncated[d]['rows']} rows truncated ({self.truncated[d]['tokens']} tokens cut), "
            f"{self.dropped[d]['rows']} dropped ({self.dropped[d]['tokens']} tokens)"
            for d in DIRECTIONS
        ]
        return f"data: max_length {max_length}, truncation={truncation}: " + "; ".join(parts)


def tokenised_root(cfg: DataConfig) -> Path:
    """The folder holding the tokenised cache entries: ``data.cache_dir`` or ``$REVMIX_CACHE/tokenised``."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "tokenised"


def raise_length_problems(stats: dict[str, dict[str, Any]], report: LoadReport, skip_invalid: bool) -> None:
    """Rows over ``max_length`` (``truncation=error``) always fail, listed with every long prompt unless
    skipped; long prompts alone fail unless ``skip_invalid``."""
    too_long = sorted(
        (Problem(f, n, "prompt", why) for d in DIRECTIONS for f, n, why in stats[d]["too_long"]), key=_place
    )
    over = [Problem(f, n, "response", why) for d in DIRECTIONS for f, n, why in stats[d]["over_length"]]
    if over:  # data.truncation=error: every row over max_length (and every long prompt) at once
        shown = over + ([] if skip_invalid else too_long)
        raise DataError(report.source, sorted(shown, key=_place), report.n_read)
    raise_unless_skipped(too_long, report, skip_invalid)


def losses_meta(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The rows and tokens lost to ``max_length`` per direction, and the prompts too long, for meta.json."""
    return {
        "truncated": {
            d: {"rows": stats[d]["truncated"], "tokens": stats[d]["truncated_tokens"]} for d in DIRECTIONS
        },
        "dropped": {
            d: {"rows": stats[d]["dropped"], "tokens": stats[d]["dropped_tokens"]} for d in DIRECTIONS
        },
        "too_long": sum(len(stats[d]["too_long"]) for d in DIRECTIONS),
    }


def _place(problem: Problem) -> tuple[str, int]:
    return problem.file, problem.line


def raise_unless_skipped(problems: list[Problem], report: LoadReport, skip_invalid: bool) -> None:
    """Raise the problems as one DataError unless ``data.skip_invalid``."""
    if problems and not skip_invalid:
        raise DataError(report.source, problems, report.n_read)
