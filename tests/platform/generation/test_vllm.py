"""vLLM backend parity with the hf backend (float32, CPU build of vLLM) and the Ray LLM paths.

Skipped where vLLM is not installed (the core venv); CI's second environment (`.venv-vllm`, docs/vllm_cpu.md)
runs them. One engine actor for the module; it is closed before the Ray Data and Ray Serve LLM tests,
which start their own replicas and would not fit on 2 CPUs beside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

vllm = pytest.importorskip("vllm")

from revmix.platform.generation.hf import HFGenerator  # noqa: E402
from revmix.platform.generation.protocol import SamplingParams, prepare_prompts  # noqa: E402
from revmix.platform.generation.vllm_backend import VLLMGenerator  # noqa: E402
from tests.platform.generation.helpers import QUESTIONS, varied_model_dir  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.integration, pytest.mark.slow]
MAX_NEW = 24

for key, value in {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}.items():
    os.environ.setdefault(key, value)


def _norm(rows: list[list[str]]) -> list[list[str]]:
    """vLLM's incremental detokenizer holds back the incomplete UTF-8 bytes of a completion cut by
    max_tokens; transformers' decode renders them as U+FFFD. The random test model emits stray bytes, so
    compare without a trailing replacement character (text elsewhere must match exactly)."""
    return [[t.rstrip("\ufffd") for t in row] for row in rows]


@pytest.fixture(scope="module")
def local() -> HFGenerator:
    return HFGenerator(varied_model_dir(), batch_size=8, dtype="float32")


@pytest.fixture(scope="module")
def engine(ray_local) -> Iterator[VLLMGenerator]:
    gen = VLLMGenerator(varied_model_dir(), dtype="float32", max_model_len=256).start()
    yield gen
    gen.close()


def test_greedy_equals_hf(engine: VLLMGenerator, local: HFGenerator) -> None:
    prompts = prepare_prompts(local, QUESTIONS)
    params = SamplingParams(max_new_tokens=MAX_NEW)
    assert _norm(engine.generate(prompts, params)) == _norm(local.generate(prompts, params))
    stop = params.replace(stop=("a", "e"))
    assert _norm(engine.generate(prompts, stop)) == _norm(local.generate(prompts, stop))


def test_prompt_logprobs_equal_hf_score(engine: VLLMGenerator, local: HFGenerator) -> None:
    prompts = prepare_prompts(local, QUESTIONS[:4])
    completions = ["Answer: 5", "x = 13 because 13 - 9 = 4", "", "The area is 12."]
    got, expected = engine.score(prompts, completions), local.score(prompts, completions)
    assert [len(g) for g in got] == [len(e) for e in expected]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=1e-5, abs=1e-4)
    assert engine.score(prompts, completions, max_tokens=2) == [
        pytest.approx(e[:2], rel=1e-5, abs=1e-4) for e in expected
    ]


def test_sampling_is_seeded(engine: VLLMGenerator) -> None:
    prompts = prepare_prompts(engine, QUESTIONS[:3])
    hot = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7, n=2)
    a = engine.generate(prompts, hot)
    assert [len(row) for row in a] == [2, 2, 2]
    assert a == engine.generate(prompts, hot)


def test_ray_data_llm_batch_equals_hf(engine: VLLMGenerator, local: HFGenerator) -> None:
    engine.close()  # free its CPU for the Ray Data engine replica
    prompts = prepare_prompts(local, QUESTIONS[:6])
    params = SamplingParams(max_new_tokens=16)
    assert _norm(engine.generate_batch(prompts, params, batch_size=4)) == _norm(
        local.generate(prompts, params)
    )


def test_ray_serve_llm_openai_app(engine: VLLMGenerator, local: HFGenerator) -> None:
    import openai
    from ray import serve

    from revmix.platform.generation.serve import start_server

    engine.close()
    url = start_server(varied_model_dir(), backend="vllm", name="varied", num_cpus=0.5)
    try:
        client = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["varied"]
        chat = client.chat.completions.create(
            model="varied", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=16, temperature=0
        )
        expected = local.generate(prepare_prompts(local, QUESTIONS[:1]), SamplingParams(max_new_tokens=16))[
            0
        ][0]
        assert chat.choices[0].message.content.rstrip("\ufffd") == expected.rstrip("\ufffd")
    finally:
        serve.shutdown()


@pytest.mark.gpu
def test_bf16_on_gpu_close_to_float32() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = VLLMGenerator(varied_model_dir(), dtype="bfloat16", use_actor=False)
    ref = HFGenerator(varied_model_dir(), dtype="float32", device="cpu")
    prompts = prepare_prompts(ref, QUESTIONS[:4])
    completions = ["Answer: 5", "x = 13", "hello", "12"]
    for g, e in zip(gen.score(prompts, completions), ref.score(prompts, completions)):
        assert g == pytest.approx(e, abs=0.1)  # bf16 rounding only (~0.05 nats seen)
    gen.close()
