"""The canonical direction-tagged row.

One row per item per question direction. A forward row and its reverse twin share ``item_id``; the
DPO pair, the unlikelihood target and the ALP margin all come from a single row via ``other_response``.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

from revmix.objectives.base import DIRECTIONS


class Direction(enum.IntEnum):
    """Question direction; stored as a small int in tensors."""

    FORWARD = 0
    REVERSE = 1

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | int | Direction) -> Direction:
        """Accept ``"forward"``/``"reverse"`` (any case), 0/1 or a Direction; raise ValueError otherwise."""
        if isinstance(value, Direction):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            if value in (0, 1):
                return cls(value)
        elif isinstance(value, str) and value.strip().lower() in DIRECTIONS:
            return cls[value.strip().upper()]
        raise ValueError(f"expected direction {' or '.join(map(repr, DIRECTIONS))}, got {value!r}")


REQUIRED_FIELDS: tuple[str, ...] = ("item_id", "direction", "task", "prompt", "response")
OPTIONAL_FIELDS: tuple[str, ...] = ("other_response", "answer")
ALL_FIELDS: tuple[str, ...] = REQUIRED_FIELDS + OPTIONAL_FIELDS


@dataclass(frozen=True)
class Row:
    """A canonical row. ``response`` is y+ (this direction's solution); ``other_response`` is y−."""

    item_id: str
    direction: str  # one of DIRECTIONS
    task: str
    prompt: str
    response: str
    other_response: str | None = None
    answer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
