"""evaluate(): accuracy per direction with the real benchmark loader and answer checker, ALP, live models."""

from __future__ import annotations

import warnings

import pytest

from revmix.platform.evaluation.alp import alp_table
from revmix.platform.evaluation.answers import extract_answer
from revmix.platform.evaluation.benchmarks import EvalItem, load_benchmark
from revmix.platform.evaluation.runner import evaluate
from revmix.platform.generation.hf import HFGenerator
from revmix.platform.generation.protocol import SamplingParams, prepare_prompts
from tests.platform.generation.helpers import varied_model_dir

SYNTH = {"synthetic_families": ["affine_mod"], "synthetic_n": 20, "seed": 3, "synthetic_test_fraction": 0.25}


class Oracle:
    """A chat-style generator that answers each question with a fixed text (no model): forward questions
    get their own solution y+, reverse questions their twin's y−."""

    chat = True

    def __init__(self, items: list[EvalItem]) -> None:
        self.answers = {
            it.prompt: it.response if it.direction == "forward" else it.other_response for it in items
        }
        self.calls = 0

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        self.calls += 1
        return [[self.answers[p]] * params.n for p in prompts]

    def score(self, prompts, completions, max_tokens=None):
        raise NotImplementedError("oracle cannot score")


def test_accuracy_per_direction_with_real_checker() -> None:
    items = load_benchmark("synthetic", **SYNTH)
    assert len(items) >= 6
    oracle = Oracle(items)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(
            oracle, ["synthetic"], benchmark_kwargs={"synthetic": SYNTH}, batch_size=2, progress=False
        )
    bench = result["benchmarks"]["synthetic"]
    fwd = [it for it in items if it.direction == "forward"]
    rev = [it for it in items if it.direction == "reverse"]
    # reverse items were answered with the forward solution: right only where both answers coincide
    rev_right = sum(extract_answer(it.other_response) == it.answer for it in rev)
    assert bench["n"] == len(items)
    assert bench["by_direction"] == {
        "forward": {"accuracy": 1.0, "n": len(fwd)},
        "reverse": {"accuracy": rev_right / len(rev), "n": len(rev)},
    }
    assert bench["accuracy"] == pytest.approx((len(fwd) + rev_right) / len(items))
    assert oracle.calls == -(-len(items) // 8)  # chunks of 4 x batch_size
    assert result["alp"] == {} and "alp" not in bench
    assert any("ALP skipped for synthetic: oracle cannot score" in str(w.message) for w in caught)


def test_live_model_and_path_agree_and_alp_matches_alp_table() -> None:
    path = varied_model_dir()
    gen = HFGenerator(path, batch_size=4)
    kwargs = dict(
        limit=6, max_new_tokens=8, alp_tokens=32, benchmark_kwargs={"synthetic": SYNTH}, progress=False
    )
    gen.model.train()
    live = evaluate(
        gen.model, ["synthetic"], tokenizer=gen.tokenizer, batch_size=4, return_predictions=True, **kwargs
    )
    assert gen.model.training  # evaluation restored training mode
    gen.model.eval()
    from_path = evaluate(path, ["synthetic"], batch_size=4, return_predictions=True, **kwargs)
    assert [p["completion"] for p in live["predictions"]] == [
        p["completion"] for p in from_path["predictions"]
    ]
    items = load_benchmark("synthetic", limit=6, **SYNTH)
    greedy = gen.generate(prepare_prompts(gen, [it.prompt for it in items]), SamplingParams(max_new_tokens=8))
    assert [p["completion"] for p in live["predictions"]] == [g[0] for g in greedy]
    expected = alp_table(gen, items, n_tokens=32)
    for d in ("forward", "reverse"):
        assert live["alp"][d]["n"] == expected[d]["n"] > 0
        assert live["alp"][d]["margin"] == pytest.approx(expected[d]["margin"], rel=1e-5, abs=1e-5)
        assert live["benchmarks"]["synthetic"]["alp"][d] == live["alp"][d]  # one benchmark: pooled == its own


def test_in_memory_items_and_custom_scorer() -> None:
    gen = HFGenerator(varied_model_dir(), batch_size=4)
    questions = ["What is 2+3?", "hi", "Compute 17 mod 5."]
    outs = [g[0] for g in gen.generate(prepare_prompts(gen, questions), SamplingParams(max_new_tokens=6))]
    items = [
        EvalItem("a", questions[0], outs[0], "exact", "forward"),
        EvalItem("b", questions[1], outs[1] + "nope", "exact", "reverse"),
        EvalItem("c", questions[2], outs[2], "exact"),
    ]
    result = evaluate(gen, {"mine": items}, max_new_tokens=6, scorer=lambda c, g, k: c == g, progress=False)
    bench = result["benchmarks"]["mine"]
    assert bench["accuracy"] == pytest.approx(2 / 3) and bench["n"] == 3
    assert bench["by_direction"] == {
        "forward": {"accuracy": 1.0, "n": 1},
        "reverse": {"accuracy": 0.0, "n": 1},
    }
    assert (
        evaluate(
            gen, {"mine": items}, limit=1, max_new_tokens=6, scorer=lambda c, g, k: c == g, progress=False
        )["benchmarks"]["mine"]["n"]
        == 1
    )
    with pytest.raises(TypeError, match="list of names"):
        evaluate(gen, "synthetic")
