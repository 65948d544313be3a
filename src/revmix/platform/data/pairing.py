"""``data.pairing``: whether a direction's training rows come from the same items as the other's.

Why: in the paper ("When Inverse Data Outperforms", arXiv 2509.13079) forward and reverse rows are twins —
two questions over the same facts — so a mixed run sees every fact from both sides. Its control draws
forward and reverse examples from *different* items: a gain that survives without shared facts comes from
the data's structure (having reverse questions at all), one that vanishes came from seeing each fact twice.

* ``twins`` (default): every training item contributes both its rows, as the data has them.
* ``independent``: the training items are split in two halves by a seeded hash of the item id; forward
  rows come from one half only, reverse rows from the other, so no item — no fact — is trained on in both
  directions. Each direction then has half the items: rows per direction halve, and a mix draws from
  those. Items with a row in one direction only are split the same way (their row is kept when it falls
  on its direction's half); the control is meant for twin data.

Only the training rows change: the train/test split comes first and the held-out rows are the same in
both modes, so evaluations compare. The Mixer still draws from per-direction row lists as a pure function
of (step, seed); it never sees which mode made them.

Two implementations of the one split, as for the train/test split (:mod:`revmix.platform.data.lazy`): the
in-process path ranks the items by their hash and gives the first ⌈n/2⌉ to forward (exact halves); the
lazy path, which keeps no list of ids, sends an item forward when its hash, read as a fraction, is below
½ (halves up to binomial noise). Both read the same hash of ``(seed, item_id)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Literal

from revmix.platform.data.schema import Direction

Pairing = Literal["twins", "independent"]


def item_fraction(item_id: str, seed: int) -> float:
    """A hash of ``(seed, item_id)`` read as a fraction in [0, 1): where the item falls in the pairing split."""
    digest = hashlib.blake2b(f"revmix.pairing/{seed}/{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def forward_items(item_ids: Sequence[str], seed: int) -> set[str]:
    """The ⌈n/2⌉ of the ``n`` distinct ids with the smallest hash: the items whose forward rows train under
    ``independent`` (the others' reverse rows do); a pure function of the set of ids and ``seed``."""
    ranked = sorted(set(item_ids), key=lambda i: (item_fraction(i, seed), i))
    return set(ranked[: (len(ranked) + 1) // 2])


def paired_rows(rows: list[dict[str, Any]], pairing: Pairing, seed: int) -> list[dict[str, Any]]:
    """The training rows ``pairing`` keeps, in their order: all of them with ``twins``; with ``independent``,
    forward rows of :func:`forward_items` and reverse rows of the other items."""
    if pairing == "twins":
        return rows
    if pairing != "independent":
        raise ValueError(f"data.pairing: expected one of twins, independent, got {pairing!r}")
    forward = forward_items([r["item_id"] for r in rows], seed)
    return [
        r for r in rows if (r["item_id"] in forward) == (Direction.parse(r["direction"]).label == "forward")
    ]


def keeps_row(item_id: str, direction: str, pairing: Pairing, seed: int) -> bool:
    """The lazy path's test for one row (no list of ids): with ``independent`` a forward row is kept when its
    item's :func:`item_fraction` is below ½, a reverse row when it is not; every row with ``twins``."""
    if pairing == "twins":
        return True
    return (item_fraction(item_id, seed) < 0.5) == (direction == "forward")


def pairing_line(rows_in: int, kept: list[dict[str, Any]], pairing: Pairing) -> str | None:
    """One line saying what ``independent`` kept (None with ``twins``: nothing changes)."""
    if pairing == "twins":
        return None
    items = {
        d: {r["item_id"] for r in kept if Direction.parse(r["direction"]).label == d}
        for d in ("forward", "reverse")
    }
    return (
        f"data: pairing independent: forward rows from {len(items['forward'])} items, reverse rows from "
        f"{len(items['reverse'])} other items; {rows_in - len(kept)} of {rows_in} training rows left out"
    )
