"""``revmix serve`` (HF backend on Ray Serve) queried with the official openai client and OpenAIGenerator.

One server for the module (start-up costs ~10-20 s); Serve is shut down at the end.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from revmix.platform.generation.hf import HFGenerator
from revmix.platform.generation.openai_backend import EndpointError, OpenAIGenerator
from revmix.platform.generation.protocol import SamplingParams, chat_prompt, prepare_prompts
from tests.platform.generation.helpers import QUESTIONS, tiny_dir, varied_model_dir

NAME = "varied"
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def base_url(ray_local) -> Iterator[str]:
    from ray import serve

    from revmix.platform.generation.serve import start_server

    url = start_server(varied_model_dir(), name=NAME, num_cpus=0.5, batch_size=8)
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def local() -> HFGenerator:
    return HFGenerator(varied_model_dir(), batch_size=4)


@pytest.fixture(scope="module")
def client(base_url: str):
    import openai

    return openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=60)


def test_models_route(client) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completions_and_chat_equal_local_greedy(client, local: HFGenerator) -> None:
    prompts = [chat_prompt(local.tokenizer, q) for q in QUESTIONS[:4]]
    expected = [row[0] for row in local.generate(prompts, SamplingParams(max_new_tokens=16))]
    resp = client.completions.create(model=NAME, prompt=prompts, max_tokens=16, temperature=0)
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == expected
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=16, temperature=0
    )
    assert chat.choices[0].message.content == expected[0]
    assert chat.usage.prompt_tokens == len(local.encode([prompts[0]])[0])
    stream = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": QUESTIONS[0]}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == expected[0]


def test_openai_generator_matches_hf(base_url: str, local: HFGenerator) -> None:
    params = SamplingParams(max_new_tokens=12)
    chat = OpenAIGenerator(base_url, model=NAME, chat=True, concurrency=8)
    # 10 concurrent requests: the server batches them; output must not depend on batching
    assert chat.generate(prepare_prompts(chat, QUESTIONS), params) == local.generate(
        prepare_prompts(local, QUESTIONS), params
    )
    raw = OpenAIGenerator(base_url, chat=False)  # model discovered from /v1/models
    assert raw.model == NAME
    prompts = prepare_prompts(local, QUESTIONS[:3])
    assert raw.generate(prompts, params.replace(stop=("a",))) == local.generate(
        prompts, params.replace(stop=("a",))
    )


def test_openai_generator_score_matches_hf(base_url: str, local: HFGenerator) -> None:
    prompts = prepare_prompts(local, QUESTIONS[:3])
    completions = ["Answer: 5", "x = 13", "hello there"]
    expected = local.score(prompts, completions)
    by_offset = OpenAIGenerator(base_url, model=NAME, chat=False).score(prompts, completions)
    by_ids = OpenAIGenerator(base_url, model=NAME, chat=True, tokenizer=local.tokenizer).score(
        QUESTIONS[:3], completions, max_tokens=3
    )
    for got, exp in zip(by_offset, expected):
        assert got == pytest.approx(exp, rel=1e-5, abs=1e-5)
    for got, exp in zip(by_ids, expected):
        assert got == pytest.approx(exp[:3], rel=1e-5, abs=1e-5)


def test_unknown_model_is_a_clear_error(base_url: str) -> None:
    gen = OpenAIGenerator(base_url, model="nope", max_retries=0)
    with pytest.raises(
        EndpointError, match=r"POST /chat/completions .* HTTP 404: The model `nope` does not exist"
    ):
        gen.generate(["q"], SamplingParams(max_new_tokens=2))


def test_serve_cli_arguments() -> None:
    from revmix.platform.generation import serve_cli
    from revmix.platform.generation.serve import default_name

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    args = parser.parse_args(["runs/x", "--port", "0", "--backend", "hf"])
    assert (args.model, args.host, args.port, args.backend, args.name) == (
        "runs/x",
        "127.0.0.1",
        0,
        "hf",
        None,
    )
    assert (args.api_key, args.max_n, args.request_timeout_s) == (None, None, None)  # defaults: the server's
    assert default_name("runs/x/") == "x"
    assert serve_cli.run(parser.parse_args(["/no/such/dir"])) == 2


def test_vllm_backend_refuses_what_it_cannot_enforce(monkeypatch, capsys) -> None:
    import ray

    from revmix.platform.generation import serve_cli

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("started Ray before refusing"))
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    for extra in (["--max-n", "2"], ["--api-key", "k"]):
        assert serve_cli.run(parser.parse_args([tiny_dir(), "--backend", "vllm", *extra])) == 2
        assert "need --backend hf" in capsys.readouterr().err
