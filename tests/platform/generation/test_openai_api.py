"""The OpenAI wire format over HFGenerator, without Ray or HTTP (serve.py only wraps this)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator

import pytest

from revmix.platform.generation.hf import Completion, HFGenerator
from revmix.platform.generation.openai_api import (
    APIError,
    GenerationJob,
    OpenAIHandler,
    ServerLimits,
    generate_isolated,
    internal_error,
    parse_prompts,
    parse_sampling,
)
from revmix.platform.generation.protocol import SamplingParams, chat_prompt
from tests.platform.generation.helpers import QUESTIONS, varied_model_dir

NAME = "varied"


@pytest.fixture(scope="module")
def gen() -> HFGenerator:
    return HFGenerator(varied_model_dir(), batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def handler(gen: HFGenerator) -> OpenAIHandler:
    return OpenAIHandler(gen, NAME)


def _direct(gen: HFGenerator):
    async def generate(ids: list[int], params: SamplingParams):
        return gen.generate_ids([ids], params)[0]

    return generate


def run(coro):
    return asyncio.run(coro)


def test_parse_sampling_defaults_and_errors() -> None:
    p = parse_sampling({"temperature": 0}, 7)
    assert (p.max_new_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed) == (7, 0.0, 1.0, 1, (), 0)
    assert parse_sampling({"stop": "x", "seed": 5, "n": 2}, 1).stop == ("x",)
    assert parse_sampling({}, 1).temperature == 1.0  # OpenAI's default
    for body, param in [({"n": 0}, "n"), ({"stop": [1]}, "stop"), ({"temperature": "hot"}, "temperature")]:
        with pytest.raises(APIError) as e:
            parse_sampling(body, 1)
        assert e.value.status == 400 and e.value.param == param
    with pytest.raises(APIError, match="top_p"):
        parse_sampling({"top_p": 0}, 1)


def test_parse_prompts_forms() -> None:
    def enc(texts: list[str]) -> list[list[int]]:
        return [[len(t)] for t in texts]

    assert parse_prompts("ab", enc) == [("ab", [2])]
    assert parse_prompts(["a", "bcd"], enc) == [("a", [1]), ("bcd", [3])]
    assert parse_prompts([5, 6], enc) == [(None, [5, 6])]
    assert parse_prompts([[5], [6, 7]], enc) == [(None, [5]), (None, [6, 7])]
    for bad in (None, [], [1, "a"], 3):
        with pytest.raises(APIError, match="'prompt' must be"):
            parse_prompts(bad, enc)


def test_completions_greedy_matches_generator(handler: OpenAIHandler, gen: HFGenerator) -> None:
    prompts = [chat_prompt(gen.tokenizer, q) for q in QUESTIONS[:3]]
    body = {"model": NAME, "prompt": prompts, "max_tokens": 12, "temperature": 0}
    resp = run(handler.completions(body, _direct(gen)))
    expected = gen.generate_detailed(prompts, SamplingParams(max_new_tokens=12))
    assert [c["text"] for c in resp["choices"]] == [row[0].text for row in expected]
    assert [c["finish_reason"] for c in resp["choices"]] == [row[0].finish_reason for row in expected]
    assert resp["usage"]["prompt_tokens"] == sum(len(ids) for ids in gen.encode(prompts))
    assert resp["usage"]["completion_tokens"] == sum(row[0].n_tokens for row in expected)
    json.dumps(resp)  # plain JSON, no dataclasses or tensors


def test_echo_scores_prompt_tokens(handler: OpenAIHandler, gen: HFGenerator) -> None:
    prompt = chat_prompt(gen.tokenizer, "What is 2+3?")
    completion = "Answer: 5"
    body = {"model": NAME, "prompt": prompt + completion, "max_tokens": 0, "echo": True, "logprobs": 1}
    (choice,) = run(handler.completions(body, _direct(gen)))["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == prompt + completion
    ids = gen.encode([prompt + completion])[0]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(
        gen.score_ids([ids[:1]], [ids[1:]])[0], rel=1e-5, abs=1e-6
    )
    # the completion's tokens are those at or after the prompt's length, and equal HFGenerator.score
    tail = [v for off, v in zip(lp["text_offset"], lp["token_logprobs"]) if off >= len(prompt)]
    assert tail == pytest.approx(gen.score([prompt], [completion])[0], rel=1e-5, abs=1e-5)
    assert "".join(lp["tokens"]) == prompt + completion
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])


def test_completion_logprobs_of_generated_tokens(handler: OpenAIHandler, gen: HFGenerator) -> None:
    prompt = chat_prompt(gen.tokenizer, QUESTIONS[0])
    body = {"model": NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3}
    (choice,) = run(handler.completions(body, _direct(gen)))["choices"]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) > 0
    for v, alts in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(alts) <= 3 and max(alts.values()) == pytest.approx(v, abs=1e-6)  # greedy takes the arg-max


def test_chat_matches_generator_and_reports_logprobs(handler: OpenAIHandler, gen: HFGenerator) -> None:
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": QUESTIONS[1]}],
        "max_tokens": 10,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    resp = run(handler.chat(body, _direct(gen)))
    (expected,) = gen.generate_detailed(
        [chat_prompt(gen.tokenizer, QUESTIONS[1])], SamplingParams(max_new_tokens=10)
    )[0]
    (choice,) = resp["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    content = choice["logprobs"]["content"]
    assert len(content) == len(expected.token_ids)
    assert all(c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"], abs=1e-6) for c in content)


def test_errors_are_openai_shaped(handler: OpenAIHandler, gen: HFGenerator) -> None:
    with pytest.raises(APIError) as e:
        run(handler.completions({"model": "other", "prompt": "x"}, _direct(gen)))
    assert e.value.status == 404 and "served: ['varied']" in e.value.message
    assert e.value.body()["error"]["code"] == 404
    with pytest.raises(APIError, match="maximum context length is 512"):
        run(handler.completions({"model": NAME, "prompt": "x", "max_tokens": 600}, _direct(gen)))
    with pytest.raises(APIError, match="messages"):
        run(handler.chat({"model": NAME, "messages": []}, _direct(gen)))
    with pytest.raises(APIError, match="n=1"):
        handler.stream_plan({"model": NAME, "prompt": "x", "n": 2}, chat=False)


def test_stream_events_concatenate(handler: OpenAIHandler, gen: HFGenerator) -> None:
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": QUESTIONS[0]}],
        "max_tokens": 10,
        "temperature": 0,
    }
    ids, params = handler.stream_plan(body, chat=True)

    async def collect() -> list[str]:
        return [e async for e in handler.stream_events(ids, params, chat=True)]

    events = run(collect())
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == gen.generate_ids([ids], params)[0][0].text
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# ------------------------------------------------------------------ limits, token ids, isolation, errors


def test_limits_name_their_flag(gen: HFGenerator) -> None:
    handler = OpenAIHandler(gen, NAME, ServerLimits(max_prompts=2, max_n=2, max_tokens=8))
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (
            {"prompt": ["a", "b", "c"]},
            "prompt",
            "'prompt' holds 3 prompts; this server's limit is 2",
            "prompts",
        ),
        ({"prompt": "a", "n": 3}, "n", "'n' is 3; this server's limit is 2", "n"),
        (
            {"prompt": "a", "max_tokens": 9},
            "max_tokens",
            "'max_tokens' is 9; this server's limit is 8",
            "tokens",
        ),
    ]
    for fields, param, message, flag in cases:
        with pytest.raises(APIError) as e:
            run(handler.completions({"model": NAME, **fields}, _direct(gen)))
        assert (e.value.status, e.value.param) == (400, param)
        assert e.value.message == f"{message} (revmix serve --max-{flag})"
    with pytest.raises(APIError, match="'max_completion_tokens' is 9") as e:
        run(handler.chat({**chat, "max_completion_tokens": 9}, _direct(gen)))
    assert e.value.param == "max_completion_tokens"
    _, params = handler.stream_plan(chat, chat=True)
    assert params.max_new_tokens == 8  # left unset: the room left in the context, capped at the limit
    with pytest.raises(ValueError, match="--max-n must be a positive number"):
        ServerLimits(max_n=0)
    with pytest.raises(ValueError, match="--request-timeout-s must be a positive number"):
        ServerLimits(request_timeout_s=float("inf"))


def test_token_ids_are_checked_against_the_vocabulary(handler: OpenAIHandler, gen: HFGenerator) -> None:
    for prompt, bad in (
        ([3, 512], "token id 512 (prompt 0, position 1)"),
        ([[4], [5, -1]], "token id -1 (prompt 1"),
    ):
        with pytest.raises(APIError) as e:
            run(handler.completions({"model": NAME, "prompt": prompt}, _direct(gen)))
        assert (e.value.status, e.value.param) == (400, "prompt")
        assert bad in e.value.message and "valid ids are 0 to 511" in e.value.message
        with pytest.raises(APIError, match="outside the vocabulary"):
            handler.stream_plan({"model": NAME, "prompt": prompt, "stream": True}, chat=False)
    with pytest.raises(ValueError, match="token id 600"):  # the generator refuses too, whoever calls it
        gen.generate_ids([[600]], SamplingParams(max_new_tokens=1))


class _FlakyGenerator:
    """Fails any call whose prompts include token 13; records calls and the stop predicate."""

    def __init__(self) -> None:
        self.calls: list[list[list[int]]] = []

    def generate_ids(
        self, ids: list[list[int]], params: SamplingParams, should_stop
    ) -> list[list[Completion]]:
        self.calls.append(ids)
        self.stopped = should_stop()
        if any(13 in p for p in ids):
            raise RuntimeError("bad row")
        return [[Completion(str(p), 1, "length")] for p in ids]


def test_one_failing_request_fails_only_itself() -> None:
    fake = _FlakyGenerator()
    greedy, sampled = SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=2, temperature=1.0)
    jobs = [GenerationJob([1], greedy), GenerationJob([13], greedy), GenerationJob([2], greedy)]
    jobs.append(GenerationJob([3], sampled))
    out = run(generate_isolated(fake, jobs))
    assert [o if isinstance(o, list) else type(o) for o in out] == [
        [Completion("[1]", 1, "length")],
        RuntimeError,
        [Completion("[2]", 1, "length")],
        [Completion("[3]", 1, "length")],
    ]
    assert fake.calls == [[[1], [13], [2]], [[1]], [[13]], [[2]], [[3]]]  # one call per sampling, then alone
    for job in jobs:
        job.cancelled.set()
    run(generate_isolated(fake, jobs[:1]))
    assert fake.stopped  # every request cancelled: decoding is told to stop


def test_internal_errors_carry_an_id_not_the_exception(caplog) -> None:
    try:
        raise RuntimeError("secret path /srv/model.bin")
    except RuntimeError as e:
        with caplog.at_level("ERROR"):
            error = internal_error(e)
    body = error.body()["error"]
    assert error.status == 500 and body["id"] in body["message"] and "secret" not in json.dumps(body)
    assert body["id"] in caplog.text and "secret path" in caplog.text  # the log has it, under the id


class _EndlessStream:
    """Streams "x" every 20 ms until ``should_stop()``; keeps the predicate, which in ``HFGenerator`` its
    decoding thread polls at every step."""

    model = None  # no config: no context window to check

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [[1] * len(t) for t in texts]

    def stream_ids(
        self, ids: list[int], params: SamplingParams, should_stop: Callable[[], bool]
    ) -> Iterator[str]:
        self.should_stop = should_stop
        while not should_stop():
            time.sleep(0.02)
            yield "x"


def test_a_stream_ends_at_the_time_limit_or_when_abandoned() -> None:
    params = SamplingParams(max_new_tokens=10**6)
    fake = _EndlessStream()
    handler = OpenAIHandler(fake, NAME, ServerLimits(request_timeout_s=0.3))  # type: ignore[arg-type]

    async def all_events() -> list[str]:
        return [e async for e in handler.stream_events([1], params, chat=False)]

    *_, last, done = run(all_events())
    assert done == "data: [DONE]\n\n"
    error = json.loads(last.removeprefix("data: "))["error"]
    assert error["code"] == 408 and "(revmix serve --request-timeout-s)" in error["message"]
    assert fake.should_stop()

    async def two_then_leave() -> bool:
        events = handler.stream_events([1], params, chat=False)
        await anext(events)
        await anext(events)
        running = not fake.should_stop()
        await events.aclose()  # what the server does when its client disconnects
        return running

    assert run(two_then_leave()) and fake.should_stop()
