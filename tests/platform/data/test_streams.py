"""Per-direction streams and worker slices: the global order of a step does not depend on the workers."""

from __future__ import annotations

import pytest

from revmix.platform.data.mixer import Mixer, Schedule
from revmix.platform.data.streams import open_direction_stream, row_id, worker_slice


def _rows(direction: int, n: int) -> list[dict]:
    return [{"row_index": i, "direction": direction} for i in reversed(range(n))]  # unsorted, as Ray gives


def _step_rows(mixer: Mixer, streams: dict, step: int) -> list[str]:
    names = ("forward", "reverse")
    return [row_id(next(streams[names[d]])) for d in mixer.directions(step)]


def test_worker_slices_partition_the_global_batch():
    rows = list(range(12))
    assert worker_slice(rows, 0, 1) == rows
    parts = [worker_slice(rows, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    # micro-batches of 2 cut inside each part = the 1-worker micro-batches of 2 (grad_accum 6)
    micro = [p[k : k + 2] for p in parts for k in (0, 2)]
    assert micro == [rows[j : j + 2] for j in range(0, 12, 2)]
    with pytest.raises(ValueError, match="12 rows cannot be cut into 5 parts"):
        worker_slice(rows, 0, 5)


def test_stream_order_is_a_function_of_seed_and_count():
    a = open_direction_stream("forward", 3, _rows(0, 5))
    first_epoch = [row_id(next(a)) for _ in range(5)]
    assert sorted(first_epoch) == [f"forward/{i}" for i in range(5)]  # each row once per epoch
    b = open_direction_stream("forward", 3, list(reversed(_rows(0, 5))))  # input order does not matter
    b.skip(3)  # a resumed stream skips what was consumed
    assert [row_id(next(b)) for _ in range(2)] == first_epoch[3:]
    assert b.position == 5


def test_every_worker_draws_the_same_global_rows():
    """Two workers with their own (identical) streams see the same step rows; their slices are disjoint
    (6 rows per direction, 2 per step: no step straddles an epoch, so no row repeats within a step)."""
    mixer = Mixer(4, 6, Schedule(start=0.5), seed=11)
    workers = [
        {
            "forward": open_direction_stream("forward", 5, _rows(0, 6)),
            "reverse": open_direction_stream("reverse", 5, _rows(1, 6)),
        }
        for _ in range(2)
    ]
    for step in range(6):
        drawn = [_step_rows(mixer, w, step) for w in workers]
        assert drawn[0] == drawn[1]
        mine = [worker_slice(drawn[r], r, 2) for r in range(2)]
        assert not set(mine[0]) & set(mine[1]) and mine[0] + mine[1] == drawn[0]
    assert workers[0]["reverse"].position == mixer.consumed(6)[1] == 12


def test_empty_direction_fails_when_drawn():
    stream = open_direction_stream("reverse", 0, [])
    with pytest.raises(ValueError, match="no training rows for direction 'reverse'"):
        next(stream)
