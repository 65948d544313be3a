"""vLLM rollouts for PPO: merged LoRA weights equal peft's merge, config errors, and (where vLLM is
installed: CI's `.venv-vllm`) that the engine samples with the weights pushed into it at every step,
in-process and in a Ray actor, and that a PPO stage trains with it end to end."""

from __future__ import annotations

import json

import pytest
import torch

from revmix.config import load_config
from revmix.objectives.base import build_objective
from revmix.objectives.ppo import attach_value_head
from revmix.platform.generation.protocol import SamplingParams, vllm_usable
from revmix.platform.models import LoraSpec, apply_lora, load_model
from revmix.platform.rollout.engines import HFRolloutEngine, RolloutEngine, build_rollout_engine
from revmix.platform.rollout.vllm_engine import checkpoint_names, merged_weights

needs_vllm = pytest.mark.skipif(not vllm_usable(), reason="vLLM is not usable here (CI's .venv-vllm has it)")


def lora_policy(path: str, seed: int = 0) -> torch.nn.Module:
    """A LoRA policy whose adapter is not zero (B starts at zero; give it values) so merging matters;
    the same ``seed`` gives the same weights (peft draws A from torch's global RNG)."""
    torch.manual_seed(seed)
    model = apply_lora(load_model(path), LoraSpec(r=4, alpha=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def test_merged_weights_equal_peft_merge_and_leave_the_policy_untouched(tiny):
    path, _, _ = tiny
    policy = lora_policy(path)
    attach_value_head(policy)  # training-only head: never sent to the engine
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    got = dict(merged_weights(policy))
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())  # no merge/unmerge drift

    reference = lora_policy(path).merge_and_unload().state_dict()
    reference.pop("lm_head.weight")  # tied to embed_tokens: save_pretrained leaves it out too
    assert sorted(got) == sorted(reference) == sorted(checkpoint_names(policy))
    diffs = {k: float((got[k] - reference[k]).abs().max()) for k in got}
    assert max(diffs.values()) < 1e-6
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(got[q], load_model(path).state_dict()[q], atol=1e-3)  # the delta is in


def test_full_model_weights_are_its_state_dict_without_the_value_head(tiny):
    path, _, _ = tiny
    model = load_model(path)
    attach_value_head(model)
    got = dict(merged_weights(model))
    assert not any(k.startswith("v_head") for k in got)
    plain = load_model(path).state_dict()
    assert sorted(got) == sorted(k for k in plain if k != "lm_head.weight")
    assert all(torch.equal(got[k], plain[k]) for k in got)


def test_rollout_backend_is_validated_before_anything_runs():
    with pytest.raises(
        ValueError,
        match=r"stages\.1\.objective\.rollout_backend: 'vlm' is not one of auto, hf, vllm \(did you mean 'vllm'\?\)",
    ):
        build_objective({"name": "ppo", "rollout_backend": "vlm"}, path="stages.1.objective")
    with pytest.raises(
        ValueError,
        match=r"stages\.1\.objective\.vllm_engine: placement 'remote' is not one of auto, local, actor",
    ):
        build_objective({"name": "ppo", "vllm_engine": {"placement": "remote"}}, path="stages.1.objective")


def test_auto_backend_is_hf_without_a_gpu(tiny):
    if torch.cuda.is_available():
        pytest.skip("auto picks vLLM on a GPU")
    path, tok, _ = tiny
    engine = build_rollout_engine(build_objective({"name": "ppo"}), load_model(path), tok, path)
    assert isinstance(engine, HFRolloutEngine)


@pytest.mark.skipif(vllm_usable(), reason="checks the message shown where vLLM is missing")
def test_vllm_backend_without_vllm_says_how_to_install(tiny):
    path, tok, _ = tiny
    obj = build_objective({"name": "ppo", "rollout_backend": "vllm"})
    with pytest.raises(ImportError, match=r"rollout_backend 'vllm' needs vLLM.*\[vllm\].*setup_vllm_cpu"):
        build_rollout_engine(obj, load_model(path), tok, path)


# --------------------------------------------------------------------------------------------------
# With vLLM (float32 on CPU: greedy tokens equal transformers', docs/vllm_cpu.md)
# --------------------------------------------------------------------------------------------------

GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)


def _perturb_adapter(policy: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def _check_engine_follows_weights(engine, path: str, tok, rows: list[dict]) -> None:
    policy = lora_policy(path)
    hf = HFRolloutEngine.for_policy(policy, tok)
    prompts = [r["prompt_ids"] for r in rows[:4]]
    first = engine.generate(policy, prompts, GREEDY)
    assert first == hf.generate(policy, prompts, GREEDY)
    _perturb_adapter(policy, seed=1)  # an optimizer step, in effect
    second = engine.generate(policy, prompts, GREEDY)
    assert second != first  # the engine samples the NEW weights ...
    assert second == hf.generate(policy, prompts, GREEDY)  # ... exactly the policy's
    fresh = lora_policy(path)  # back to the first weights: the first outputs come back
    assert engine.generate(fresh, prompts, GREEDY) == first


@pytest.fixture(scope="module")
def local_engine(tiny):
    if not vllm_usable():
        pytest.skip("vLLM is not usable here (CI's .venv-vllm has it)")
    from revmix.platform.rollout.engines import eos_token_ids
    from revmix.platform.rollout.vllm_engine import VLLMRolloutEngine

    path, tok, _ = tiny
    engine = VLLMRolloutEngine(
        path, eos_token_ids(load_model(path), tok), placement="local", max_model_len=512
    )
    yield engine
    engine.close()


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_local_engine_generates_with_the_pushed_weights(local_engine, tiny):
    path, tok, rows = tiny
    assert isinstance(local_engine, RolloutEngine)
    threads = torch.get_num_threads()
    syncs = local_engine.syncs
    _check_engine_follows_weights(local_engine, path, tok, rows)
    assert local_engine.syncs == syncs + 3  # one weight push per generate
    assert torch.get_num_threads() == threads  # the engine does not change the trainer's threads


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_local_engine_sampling_is_seeded_and_ends_at_eos(local_engine, tiny):
    path, tok, rows = tiny
    policy = lora_policy(path)
    prompts = [r["prompt_ids"] for r in rows[:3]]
    hot = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=11)
    a = local_engine.generate(policy, prompts, hot)
    assert [len(x) for x in a] == [3, 3, 3]
    assert local_engine.generate(policy, prompts, hot) == a
    assert local_engine.generate(policy, prompts, hot.replace(seed=12)) != a
    assert len({tuple(o) for o in a[0]}) > 1  # the n samples of one prompt differ
    eos = set(local_engine.eos_ids)
    for outs in a:
        for o in outs:
            assert 1 <= len(o) <= 12 and not eos & set(o[:-1])  # EOS only ever last


@needs_vllm
@pytest.mark.vllm
@pytest.mark.integration
@pytest.mark.slow
def test_actor_engine_generates_with_the_pushed_weights(ray_local, local_engine, tiny):
    from revmix.platform.rollout.engines import eos_token_ids
    from revmix.platform.rollout.vllm_engine import VLLMRolloutEngine

    path, tok, rows = tiny
    local_engine.close()  # two engines do not fit beside Ray on 2 CPUs
    engine = VLLMRolloutEngine(
        path, eos_token_ids(load_model(path), tok), placement="actor", max_model_len=512, num_cpus=0.5
    )
    try:
        assert engine.placement == "actor"
        _check_engine_follows_weights(engine, path, tok, rows)
    finally:
        engine.close()


@needs_vllm
@pytest.mark.vllm
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(
    "runtime",
    [
        [],  # in-process trainer, engine in the same process
        # two Ray Train workers, each with an engine in its own actor (0.5 CPU each: 2 CPUs in all)
        [
            "runtime.num_workers=2",
            "runtime.cpus_per_worker=0.5",
            "stages.1.objective.vllm_engine={num_cpus: 0.5}",
        ],
    ],
    ids=["in_process", "two_workers_actor_engines"],
)
def test_ppo_stage_trains_with_vllm_rollouts(ray_local, tmp_path, runtime: list[str]):
    from revmix.platform.train import run_experiment

    cfg = load_config(
        "configs/runs/ppo_tiny.yaml",
        [
            "stages.0.steps=20",
            "stages.1.steps=3",
            "stages.1.objective.rollout_backend=vllm",
            "stages.1.objective.max_new_tokens=24",
            "eval.benchmarks=[]",
            *runtime,
        ],
    )
    run_experiment(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ppo = [r for r in records if r["stage"] == 1]
    assert [r["step"] for r in ppo] == [1, 2, 3]
    for r in ppo:
        assert r["ppo/time/rollout_s"] > 0
        assert 0.0 <= r["ppo/accuracy"] <= 1.0 and torch.isfinite(torch.tensor(r["loss"]))
        assert "ppo/kl" in r and "ppo/response_length" in r
    assert (tmp_path / "run" / "stages" / "1" / "adapter" / "adapter_config.json").exists()  # a LoRA stage


@needs_vllm
@pytest.mark.vllm
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_local_engine_sleeps_between_rollouts_and_follows_weights(tiny):
    """On a GPU the in-process engine takes a slice of memory and sleeps between rollouts; float32 so
    greedy tokens can be compared with transformers' on the same (CUDA) policy."""
    from revmix.platform.rollout.engines import eos_token_ids
    from revmix.platform.rollout.vllm_engine import VLLMRolloutEngine

    path, tok, rows = tiny
    policy = lora_policy(path).to("cuda")
    engine = VLLMRolloutEngine(
        path,
        eos_token_ids(policy, tok),
        placement="local",
        max_model_len=512,
        engine_kwargs={"dtype": "float32"},
    )
    try:
        assert engine.engine_kwargs["enable_sleep_mode"] and engine._local is not None
        hf = HFRolloutEngine.for_policy(policy, tok)
        prompts = [r["prompt_ids"] for r in rows[:4]]
        first = engine.generate(policy, prompts, GREEDY)
        assert engine._local.sleeping  # KV cache released for the optimiser
        assert first == hf.generate(policy, prompts, GREEDY)
        _perturb_adapter(policy, seed=1)
        second = engine.generate(policy, prompts, GREEDY)  # wakes, reloads, samples
        assert second != first and second == hf.generate(policy, prompts, GREEDY)
    finally:
        engine.close()
