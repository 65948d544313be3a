import pytest

from revmix.platform.data.mixer import Mixer, Schedule


def test_fixed_total_exact_counts_worked_example():
    # The docstring's worked example: 400 items, r = 0.25, batch 8 → 50 steps, 100 reverse examples.
    m = Mixer(8, 50, Schedule(start=0.25))
    assert [m.counts(s) for s in range(3)] == [(6, 2)] * 3
    assert sum(m.counts(s)[1] for s in range(50)) == 100
    assert m.consumed(50) == (300, 100)


@pytest.mark.parametrize("r", [0.0, 1 / 3, 0.5, 0.7, 1.0])
def test_totals_are_exact_and_per_step_within_one(r):
    m = Mixer(6, 37, Schedule(start=r))
    revs = [m.counts(s)[1] for s in range(37)]
    assert sum(revs) == round(6 * 37 * r)
    assert max(revs) - min(revs) <= 1


def test_linear_endpoints_and_step_switch():
    m = Mixer(10, 11, Schedule("linear", 0.0, 1.0))
    assert [m.counts(s)[1] for s in range(11)] == list(range(11))
    m = Mixer(4, 10, Schedule("step", 0.0, 1.0, 0.5))
    assert [m.counts(s)[1] for s in range(10)] == [0] * 5 + [4] * 5


def test_phases():
    m = Mixer(2, 10, Schedule("phases", phases=((0.3, 1.0), (1.0, 0.0))))
    assert [m.counts(s)[1] for s in range(10)] == [2, 2, 2] + [0] * 7


def test_directions_deterministic_and_seeded():
    a, b, c = (
        Mixer(8, 5, Schedule(start=0.5), seed=1),
        Mixer(8, 5, Schedule(start=0.5), seed=1),
        Mixer(8, 5, Schedule(start=0.5), seed=2),
    )
    assert [a.directions(s) for s in range(5)] == [b.directions(s) for s in range(5)]
    assert [a.directions(s) for s in range(5)] != [c.directions(s) for s in range(5)]
    assert all(sum(a.directions(s)) == 4 for s in range(5))


def test_state_round_trip_and_mismatch():
    m = Mixer(8, 5, Schedule(start=0.5), seed=1)
    assert m.check_state(m.state(3)) == 3
    with pytest.raises(ValueError, match="does not match"):
        Mixer(8, 5, Schedule(start=0.25), seed=1).check_state(m.state(3))
    with pytest.raises(IndexError):
        m.counts(5)


def test_state_written_before_the_global_order():
    """A state without "order" is read when it describes the same draws (one worker), else refused."""
    m = Mixer(8, 5, Schedule(start=0.5), seed=7919)
    one_worker = {k: v for k, v in m.state(2).items() if k != "order"}
    assert m.check_state(one_worker) == 2
    per_worker = {**one_worker, "batch_size": 4, "seed": 7919 + 1}  # rank 1 of 2, half the batch
    with pytest.raises(ValueError, match="earlier per-worker data order .* without --resume"):
        m.check_state(per_worker)
