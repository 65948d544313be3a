from revmix.platform.data.synthetic import generate
from revmix.platform.evaluation.hooks import _balanced, flatten_alp, heldout_items


def test_heldout_items_keep_direction_and_twins():
    rows = generate("affine_mod", 3, seed=0)
    items = heldout_items(rows)
    assert [it.direction for it in items] == ["forward", "reverse"] * 3
    assert all(it.kind == "exact" and it.response and it.other_response for it in items)
    assert items[0].response == items[1].other_response  # twins swap y+ and y−
    assert [it.direction for it in _balanced(items, 1)] == ["forward", "reverse"]


def test_flatten_alp_drops_counts_and_missing():
    table = {
        "forward": {"chosen": -1.0, "rejected": -2.0, "margin": 1.0, "n": 3},
        "reverse": {"margin": None, "n": 0},
    }
    assert flatten_alp(table) == {
        "alp/forward/chosen": -1.0,
        "alp/forward/rejected": -2.0,
        "alp/forward/margin": 1.0,
    }
