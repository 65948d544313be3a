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


class Scripted:
    """A chat-style generator with fixed samples: forward items get [right, wrong, wrong] (the vote picks
    the wrong answer), reverse items [wrong, right, right] (the vote picks the right one)."""

    chat = True

    def __init__(self, items: list[EvalItem]) -> None:
        self.samples = {
            it.prompt: [f"Answer: {it.answer}", "wrong", "wrong"]
            if it.direction == "forward"
            else ["wrong", f"Answer: {it.answer}", f"Answer: {it.answer}"]
            for it in items
        }
        self.calls = 0

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        self.calls += 1
        assert params.n == 3
        return [self.samples[p] for p in prompts]

    def score(self, prompts, completions, max_tokens=None):
        raise NotImplementedError("scripted samples cannot score")


def test_samples_give_mean_accuracy_pass_at_k_and_maj_at_k_per_direction() -> None:
    items = load_benchmark("synthetic", **SYNTH)
    n_fwd = sum(it.direction == "forward" for it in items)
    gen = Scripted(items)
    result = evaluate(
        gen,
        {"synthetic": items},
        sampling=SamplingParams(max_new_tokens=4, temperature=1.0, n=3),
        one_call=True,
        alp=False,
        progress=False,
        return_predictions=True,
    )
    assert gen.calls == 1  # one_call: every prompt in one generate call
    bench = result["benchmarks"]["synthetic"]
    third = 1 / 3
    assert bench["by_direction"]["forward"] == pytest.approx(
        {"accuracy": third, "n": n_fwd, "pass@1": third, "pass@3": 1.0, "maj@1": 1.0, "maj@3": 0.0}
    )
    assert bench["by_direction"]["reverse"] == pytest.approx(
        {
            "accuracy": 2 * third,
            "n": len(items) - n_fwd,
            "pass@1": 2 * third,
            "pass@3": 1.0,
            "maj@1": 0.0,
            "maj@3": 1.0,
        }
    )
    share = n_fwd / len(items)
    assert bench["accuracy"] == pytest.approx(third * share + 2 * third * (1 - share))
    assert bench["maj@3"] == pytest.approx(1 - share) and bench["samples"] == 3
    first = result["predictions"][0]
    assert first["samples_correct"] == [True, False, False] and first["correct"] is True


def test_hf_sampling_is_seeded() -> None:
    gen = HFGenerator(varied_model_dir(), batch_size=4)
    items = load_benchmark("synthetic", limit=4, **SYNTH)

    def completions(seed: int) -> list[list[str]]:
        params = SamplingParams(max_new_tokens=6, temperature=1.0, n=3, seed=seed)
        result = evaluate(
            gen, {"s": items}, sampling=params, alp=False, progress=False, return_predictions=True
        )
        assert result["benchmarks"]["s"]["samples"] == 3 and "pass@3" in result["benchmarks"]["s"]
        return [p["samples"] for p in result["predictions"]]

    first = completions(1)
    assert completions(1) == first
    assert completions(2) != first
    assert any(len(set(row)) > 1 for row in first)  # samples of one item differ
