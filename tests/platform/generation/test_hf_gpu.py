"""HFGenerator on a CUDA GPU: float32 agrees with the CPU backend; bf16 stays within rounding distance.

Skipped without CUDA. The measured agreement is printed (run with ``-s``) so a GPU run can report it.
"""

from __future__ import annotations

import pytest
import torch

from revmix.platform.generation.hf import HFGenerator
from revmix.platform.generation.protocol import SamplingParams, prepare_prompts
from tests.platform.generation.helpers import QUESTIONS, varied_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
COMPLETIONS = [
    "Answer: 5",
    "x = 13 because 13 - 9 = 4",
    "hello",
    "12",
    "7",
    "two",
    "2",
    "f(4) = 9",
    "7",
    "ok",
]


@pytest.fixture(scope="module")
def cpu() -> HFGenerator:
    return HFGenerator(varied_model_dir(), device="cpu", dtype="float32", batch_size=4)


def test_float32_gpu_matches_cpu(cpu: HFGenerator) -> None:
    gpu = HFGenerator(varied_model_dir(), device="cuda", dtype="float32", batch_size=4)
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).dtype == torch.float32
    prompts = prepare_prompts(cpu, QUESTIONS)
    worst = max(
        abs(a - b)
        for ga, ca in zip(gpu.score(prompts, COMPLETIONS), cpu.score(prompts, COMPLETIONS))
        for a, b in zip(ga, ca)
    )
    params = SamplingParams(max_new_tokens=24)
    same = sum(g == c for g, c in zip(gpu.generate(prompts, params), cpu.generate(prompts, params)))
    print(f"\nfloat32 GPU vs CPU: max |Δ log-prob| = {worst:.2e}, greedy identical on {same}/{len(prompts)}")
    assert worst < 1e-3
    assert same >= len(prompts) - 1  # a near-tie arg-max may flip on one random-model prompt at most


def test_bf16_gpu_close_and_batch_invariant(cpu: HFGenerator) -> None:
    gpu = HFGenerator(varied_model_dir(), device="cuda", batch_size=4)  # default dtype on CUDA: bf16
    assert next(gpu.model.parameters()).dtype == torch.bfloat16
    prompts = prepare_prompts(cpu, QUESTIONS)
    worst = max(
        abs(a - b)
        for ga, ca in zip(gpu.score(prompts, COMPLETIONS), cpu.score(prompts, COMPLETIONS))
        for a, b in zip(ga, ca)
    )
    params = SamplingParams(max_new_tokens=16)
    batched = gpu.generate(prompts, params)
    gpu.batch_size = 1
    single = gpu.generate(prompts, params)
    same = sum(a == b for a, b in zip(batched, single))
    print(
        f"\nbf16 GPU vs float32 CPU: max |Δ log-prob| = {worst:.3f}; batched == unbatched greedy on {same}/{len(prompts)}"
    )
    assert worst < 0.25
    assert same >= len(prompts) // 2
