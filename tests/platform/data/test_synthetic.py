"""Synthetic forward/reverse families: hand-computed texts, exact inverses, twins, overlap, limits, splits."""

from __future__ import annotations

import random
import re
import statistics

import pytest

from revmix.platform.data.schema import ALL_FIELDS, Row
from revmix.platform.data.synthetic import (
    FAMILIES,
    _twins,
    family_names,
    generate,
    generate_mix,
    split_by_item,
    verify_row,
)

NAMES = ["affine_mod", "arith_chain", "string_ops", "base_conv"]


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+|\d+", text.lower()))


def jaccard(a: str, b: str) -> float:
    wa, wb = words(a), words(b)
    return len(wa & wb) / len(wa | wb)


def test_family_names() -> None:
    assert family_names() == NAMES


# --- hand-computed texts and maths -------------------------------------------------------------------


def test_affine_mod_by_hand() -> None:
    fam, p = FAMILIES["affine_mod"], (3, 5, 11)
    assert fam.apply(p, "4") == "6"  # 3*4 + 5 = 17 = 6 mod 11
    assert fam.invert(p, "6") == "4"
    assert fam.prompt(p, "forward", "4") == "Let y = (3*x + 5) mod 11, with 0 <= x < 11. Given x = 4, find y."
    assert fam.prompt(p, "reverse", "6") == "Let y = (3*x + 5) mod 11, with 0 <= x < 11. Given y = 6, find x."
    assert fam.solution(p, "forward", "4") == "3*4 = 12\n12 + 5 = 17\n17 mod 11 = 6\nAnswer: 6"
    assert fam.solution(p, "reverse", "6") == (
        "6 - 5 = 1\n1 mod 11 = 1\n3*4 = 12 = 1 mod 11, so 1/3 = 4\n1*4 = 4\n4 mod 11 = 4\n"
        "Check: 3*4 = 12\n12 + 5 = 17\n17 mod 11 = 6\nAnswer: 4"
    )
    # y < b: 2 - 5 = -3 = 8 mod 11; 8*4 = 32 = 10 mod 11; check 3*10 + 5 = 35 = 2 mod 11.
    assert fam.solution(p, "reverse", "2").startswith("2 - 5 = -3\n-3 mod 11 = 8\n")
    assert fam.solution(p, "reverse", "2").endswith("35 mod 11 = 2\nAnswer: 10")


def test_arith_chain_by_hand() -> None:
    fam, p = FAMILIES["arith_chain"], (("+", 3), ("*", 2), ("-", 5), ("/", 3))
    assert fam.apply(p, "4") == "3"  # ((4 + 3) * 2 - 5) / 3
    assert fam.invert(p, "3") == "4"
    assert fam.prompt(p, "forward", "4") == (
        "Start from x, then add 3, multiply by 2, subtract 5, divide by 3 to get y. Given x = 4, find y."
    )
    assert fam.solution(p, "forward", "4") == "4 + 3 = 7\n7 * 2 = 14\n14 - 5 = 9\n9 / 3 = 3\nAnswer: 3"
    assert fam.solution(p, "reverse", "3") == (
        "3 * 3 = 9\n9 + 5 = 14\n14 / 2 = 7\n7 - 3 = 4\n"
        "Check: 4 + 3 = 7\n7 * 2 = 14\n14 - 5 = 9\n9 / 3 = 3\nAnswer: 4"
    )
    with pytest.raises(ValueError, match="not exact"):
        fam.invert((("*", 2),), "7")  # 7 has no integer preimage under x*2


def test_string_ops_by_hand() -> None:
    fam = FAMILIES["string_ops"]
    p = (("reverse", 0), ("rotate", 2), ("shift", 3))
    assert fam.apply(p, "abcde") == "fedhg"  # edcba -> cbaed -> (+3 each) fedhg
    assert fam.solution(p, "forward", "abcde") == (
        "a b c d e\nreverse: e d c b a\nrotate left 2: c b a e d\nshift 3: f e d h g\nAnswer: fedhg"
    )
    assert fam.invert(p, "fedhg") == "abcde"
    assert fam.solution(p, "reverse", "fedhg").startswith(
        "f e d h g\nshift -3: c b a e d\nrotate right 2: e d c b a\nreverse: a b c d e\nCheck: a b c d e\n"
    )
    assert fam.apply((("shift", 3), ("reverse", 0)), "xyz") == "cba"  # wraps: xyz -> abc
    assert fam.prompt(p, "reverse", "fedhg") == (
        "Take word s, then reverse it, rotate left by 2, shift letters by 3 to get t. Given t = fedhg, find s."
    )


def test_base_conv_by_hand() -> None:
    fam, p = FAMILIES["base_conv"], (3,)
    assert fam.apply(p, "23") == "212"  # 2*9 + 1*3 + 2
    assert fam.invert(p, "212") == "23"
    assert (
        fam.prompt(p, "reverse", "212") == "Let d be the base 3 digits of a number n. Given d = 212, find n."
    )
    assert fam.solution(p, "forward", "23") == "23 = 7*3 + 2\n7 = 2*3 + 1\n2 = 0*3 + 2\nAnswer: 212"
    assert fam.solution(p, "reverse", "212") == (
        "2 1 2\n2*3 + 1 = 7\n7*3 + 2 = 23\nCheck: 23 = 7*3 + 2\n7 = 2*3 + 1\n2 = 0*3 + 2\nAnswer: 23"
    )


# --- generation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", NAMES)
def test_deterministic_by_seed_and_prefix_stable(family: str) -> None:
    state = random.getstate()
    a = generate(family, 50, seed=7)
    random.seed(12345)  # global random state must not matter
    assert generate(family, 50, seed=7) == a
    assert generate(family, 50, seed=8) != a
    assert generate(family, 20, seed=7) == a[:40]  # prefix-stable
    random.setstate(state)


@pytest.mark.parametrize("family", NAMES)
def test_twin_structure(family: str) -> None:
    rows = generate(family, 200, seed=0)
    assert len(rows) == 400
    ids = [r["item_id"] for r in rows[::2]]
    assert len(set(ids)) == 200 and ids[17] == f"{family}-s0-00017"
    for fwd, rev in zip(rows[::2], rows[1::2]):
        assert tuple(fwd) == ALL_FIELDS and tuple(rev) == ALL_FIELDS
        Row(**fwd), Row(**rev)  # noqa: B018 — the schema accepts them
        assert (fwd["direction"], rev["direction"]) == ("forward", "reverse")
        assert fwd["item_id"] == rev["item_id"] and fwd["task"] == rev["task"] == f"synthetic/{family}"
        assert fwd["response"] == rev["other_response"] and rev["response"] == fwd["other_response"]
        assert fwd["response"].endswith(f"\nAnswer: {fwd['answer']}")
        assert rev["response"].endswith(f"\nAnswer: {rev['answer']}")
        assert fwd["answer"] != "" and rev["answer"] != ""


@pytest.mark.parametrize("family", NAMES)
def test_exact_inverse_property(family: str) -> None:
    fam = FAMILIES[family]
    rows = generate(family, 500, seed=3)
    for fwd, rev in zip(rows[::2], rows[1::2]):
        p, d_f, x = fam.parse(fwd["prompt"])
        p_r, d_r, y = fam.parse(rev["prompt"])
        assert (d_f, d_r) == ("forward", "reverse") and p == p_r
        assert y == fwd["answer"]  # the forward answer is the reverse question's given ...
        assert rev["answer"] == x  # ... and the reverse answer recovers the premise
        assert fam.invert(p, fam.apply(p, x)) == x and fam.apply(p, fam.invert(p, y)) == y
        verify_row(fwd)
        verify_row(rev)
    rng = random.Random(0)  # straight from the sampler too, beyond what generate() kept
    for _ in range(2000):
        p, x = fam.sample(rng)
        assert fam.invert(p, fam.apply(p, x)) == x


@pytest.mark.parametrize("family", NAMES)
def test_no_duplicate_facts(family: str) -> None:
    n = 1000  # base_conv holds 1259 facts, so this also exercises the dedupe hard
    rows = generate(family, n, seed=1)
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == 2 * n


def test_too_many_facts_raises() -> None:
    with pytest.raises(ValueError, match="fewer than n=2000"):
        generate("base_conv", 2000)


@pytest.mark.parametrize("family", NAMES)
def test_lengths_and_small_numbers(family: str) -> None:
    rows = generate(family, 1000, seed=2)
    assert max(len(r["prompt"]) for r in rows) <= 150
    assert max(len(r["response"]) for r in rows) <= 220
    for r in rows:
        head = r["prompt"].split(" Given ")[0]
        assert all(int(t) <= 23 for t in re.findall(r"\d+", head)), head  # operands, moduli, bases


@pytest.mark.parametrize("family", NAMES)
def test_forward_reverse_wording_overlap(family: str) -> None:
    rows = generate(family, 500, seed=0)
    prompt_j = [jaccard(f["prompt"], r["prompt"]) for f, r in zip(rows[::2], rows[1::2])]
    resp_j = [jaccard(f["response"], r["response"]) for f, r in zip(rows[::2], rows[1::2])]
    print(
        f"{family}: prompt Jaccard mean {statistics.mean(prompt_j):.3f} min {min(prompt_j):.3f}; "
        f"response Jaccard mean {statistics.mean(resp_j):.3f} min {min(resp_j):.3f}"
    )
    assert min(prompt_j) >= 0.6
    assert statistics.mean(prompt_j) >= 0.8
    assert statistics.mean(resp_j) >= 0.5
    # ... and yet the two directions never share a prompt: the question direction is what differs.
    assert all(f["prompt"] != r["prompt"] for f, r in zip(rows[::2], rows[1::2]))


# --- verify_row ---------------------------------------------------------------------------------------


def _bump_first_number(text: str) -> str:
    return re.sub(r"\d+", lambda m: str(int(m.group()) + 1), text, count=1)


TAMPERS = {
    "answer": lambda r: {**r, "answer": r["answer"] + "1"},
    "direction": lambda r: {**r, "direction": "reverse"},
    "response_step": lambda r: {**r, "response": _bump_first_number(r["response"])},
    "response_answer": lambda r: {**r, "response": r["response"].rsplit("\n", 1)[0] + "\nAnswer: 0"},
    "swapped_responses": lambda r: {**r, "response": r["other_response"], "other_response": r["response"]},
    "other_response": lambda r: {**r, "other_response": r["response"]},
    "given_value": lambda r: {**r, "prompt": r["prompt"].replace("Given x = 4,", "Given x = 5,")},
    "operand": lambda r: {**r, "prompt": r["prompt"].replace("+ 5)", "+ 6)")},
    "not_canonical": lambda r: {**r, "prompt": r["prompt"].replace("Given", "Given ")},
    "missing_field": lambda r: {k: v for k, v in r.items() if k != "answer"},
    "unknown_task": lambda r: {**r, "task": "synthetic/nope"},
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_verify_row_rejects_tampered_row(tamper: str) -> None:
    fam, p = FAMILIES["affine_mod"], (3, 5, 11)
    fwd, _ = _twins(fam, "affine_mod-test", p, "4")
    verify_row(fwd)  # the untouched row passes
    with pytest.raises(ValueError, match="item_id='affine_mod-test'"):
        verify_row(TAMPERS[tamper](fwd))


@pytest.mark.parametrize("family", NAMES)
def test_verify_row_rejects_wrong_answer_in_every_family(family: str) -> None:
    for row in generate(family, 20, seed=5):
        verify_row(row)
        with pytest.raises(ValueError, match="field 'answer'"):
            verify_row({**row, "answer": row["answer"] + "0"})


# --- mixing, splitting, errors ------------------------------------------------------------------------


def test_generate_mix_spreads_evenly_and_interleaves() -> None:
    rows = generate_mix(["affine_mod", "string_ops", "base_conv"], 10, seed=4)
    assert len(rows) == 20
    tasks = [r["task"].removeprefix("synthetic/") for r in rows[::2]]
    assert [tasks.count(f) for f in ("affine_mod", "string_ops", "base_conv")] == [4, 3, 3]
    assert tasks[:3] == ["affine_mod", "string_ops", "base_conv"]
    assert rows == generate_mix(["affine_mod", "string_ops", "base_conv"], 10, seed=4)
    assert [r for r in rows if r["task"] == "synthetic/string_ops"] == generate("string_ops", 3, seed=4)
    with pytest.raises(ValueError, match="distinct"):
        generate_mix(["affine_mod", "affine_mod"], 4)


def test_split_by_item_has_no_leakage_and_requested_fraction() -> None:
    rows = generate_mix(NAMES, 200, seed=0)
    train, test = split_by_item(rows, 0.25, seed=0)
    train_ids, test_ids = {r["item_id"] for r in train}, {r["item_id"] for r in test}
    assert not train_ids & test_ids
    assert len(test_ids) == 50 and len(train_ids) == 150
    assert len(train) + len(test) == len(rows) and len(test) == 100  # twins stay together
    assert [r for r in rows if r["item_id"] in test_ids] == test  # row order kept
    assert split_by_item(rows, 0.25, seed=0) == (train, test)
    assert split_by_item(list(reversed(rows)), 0.25, seed=0)[1] == list(reversed(test))  # order-free
    assert {r["item_id"] for r in split_by_item(rows, 0.25, seed=1)[1]} != test_ids
    assert split_by_item(rows, 0.0)[1] == [] and split_by_item(rows, 1.0)[0] == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        split_by_item(rows, 1.5)


def test_unknown_family_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="affine_mod, arith_chain, string_ops, base_conv"):
        generate("nope", 3)
    with pytest.raises(ValueError, match="unknown synthetic family 'nope'"):
        generate_mix(["affine_mod", "nope"], 3)
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate("affine_mod", -1)
