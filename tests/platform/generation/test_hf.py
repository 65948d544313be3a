"""HFGenerator: batched greedy decoding equals one-at-a-time transformers, scoring equals a direct forward."""

from __future__ import annotations

import pytest
import torch

from revmix.platform.generation.hf import HFGenerator
from revmix.platform.generation.protocol import SamplingParams, chat_prompt
from tests.platform.generation.helpers import QUESTIONS, varied_model_dir

MAX_NEW = 24


@pytest.fixture(scope="module")
def gen() -> HFGenerator:
    return HFGenerator(varied_model_dir(), batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def prompts(gen: HFGenerator) -> list[str]:
    return [chat_prompt(gen.tokenizer, q) for q in QUESTIONS]


def _reference_greedy(gen: HFGenerator, prompt: str, max_new: int) -> tuple[list[int], bool]:
    """transformers' own generate on one unpadded prompt; tokens up to (excluding) the first EOS."""
    ids = torch.tensor([gen.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = gen.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False
        )
    new = out[0, ids.shape[1] :].tolist()
    for j, t in enumerate(new):
        if t in gen.eos_ids:
            return new[:j], True
    return new, False


def test_greedy_batched_equals_one_prompt_at_a_time(gen: HFGenerator, prompts: list[str]) -> None:
    got = gen.generate_detailed(prompts, SamplingParams(max_new_tokens=MAX_NEW))
    assert [len(row) for row in got] == [1] * len(prompts)
    n_eos = 0
    for prompt, (c,) in zip(prompts, got):
        ref, hit_eos = _reference_greedy(gen, prompt, MAX_NEW)
        assert c.text == gen.tokenizer.decode(ref, skip_special_tokens=True)
        assert c.n_tokens == len(ref) + hit_eos
        assert c.finish_reason == ("stop" if hit_eos else "length")
        n_eos += hit_eos
    # the test model is built so both cases occur; otherwise this test would not test padding after EOS
    assert 0 < n_eos < len(prompts)
    assert gen.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW)) == [[c.text] for (c,) in got]


def test_score_equals_direct_forward_pass(gen: HFGenerator, prompts: list[str]) -> None:
    completions = ["Answer: 5", "x = 13 because 13 - 9 = 4", "", "12", "7", "two", "2", "f(4) = 9", "7", "ok"]
    got = gen.score(prompts, completions)
    tok, model = gen.tokenizer, gen.model
    for prompt, completion, logps in zip(prompts, completions, got):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        assert len(logps) == len(c)
        if not c:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0]
        expected = [torch.log_softmax(logits[len(p) - 1 + j], -1)[t].item() for j, t in enumerate(c)]
        assert logps == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # truncation: the first max_tokens log-probs, unchanged
    short = gen.score(prompts, completions, max_tokens=2)
    assert short == [pytest.approx(full[:2], rel=1e-5, abs=1e-5) for full in got]


def test_score_ids_matches_score_and_rejects_empty_prompt(gen: HFGenerator) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        gen.score_ids([[]], [[5, 6]])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        gen.score(["a", "b"], ["c"])
    assert gen.score_ids([[5], [7, 8]], [[], []]) == [[], []]


def test_sampling_is_seeded_and_top_p_wired(gen: HFGenerator, prompts: list[str]) -> None:
    hot = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, n=3)
    a = gen.generate(prompts[:4], hot)
    assert a == gen.generate(prompts[:4], hot)  # same seed, same samples
    assert [len(row) for row in a] == [3] * 4
    assert a != gen.generate(prompts[:4], hot.replace(seed=4))
    greedy = gen.generate(prompts[:4], SamplingParams(max_new_tokens=12))
    assert any(s != g[0] for row, g in zip(a, greedy) for s in row)  # temperature 1 does sample
    # a nucleus this small keeps only the arg-max token: sampling must reduce to greedy
    nucleus = gen.generate(prompts[:4], SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1e-6, n=2))
    assert nucleus == [g * 2 for g in greedy]


def test_stop_strings_truncate(gen: HFGenerator, prompts: list[str]) -> None:
    full = gen.generate_detailed(prompts, SamplingParams(max_new_tokens=MAX_NEW))
    # pick a completion with some text and stop on a piece from its middle
    text = max((c.text for (c,) in full), key=len)
    idx = prompts[[c.text for (c,) in full].index(text)]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    (c,) = gen.generate_detailed([idx], SamplingParams(max_new_tokens=MAX_NEW, stop=(stop, "\x00never")))[0]
    assert c.text == text[: text.find(stop)]
    assert c.finish_reason == "stop"


def test_in_memory_model_keeps_training_mode_and_rng(gen: HFGenerator, prompts: list[str]) -> None:
    model, tok = gen.model, gen.tokenizer
    live = HFGenerator(model, tok, batch_size=8)
    model.train()
    try:
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        live.generate(prompts[:3], SamplingParams(max_new_tokens=5, temperature=1.0))
        live.score(prompts[:3], ["a", "b", "c"])
        assert torch.equal(torch.rand(3), expected)  # evaluation did not consume the caller's RNG
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="tokenizer="):
        HFGenerator(model)


def test_stream_concatenates_to_generate(gen: HFGenerator, prompts: list[str]) -> None:
    for prompt in prompts[:3]:
        full = gen.generate([prompt], SamplingParams(max_new_tokens=MAX_NEW))[0][0]
        assert "".join(gen.stream(prompt, SamplingParams(max_new_tokens=MAX_NEW))) == full
        if len(full) > 4:
            stop = full[2:4]
            params = SamplingParams(max_new_tokens=MAX_NEW, stop=(stop,))
            assert "".join(gen.stream(prompt, params)) == full[: full.find(stop)]


def test_zero_new_tokens_and_empty_inputs(gen: HFGenerator, prompts: list[str]) -> None:
    assert gen.generate(prompts[:2], SamplingParams(max_new_tokens=0, n=2)) == [["", ""], ["", ""]]
    assert gen.generate([], SamplingParams()) == []
    assert gen.score([], []) == []
