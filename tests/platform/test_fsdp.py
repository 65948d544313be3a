"""``runtime.strategy: fsdp``: FSDP2-sharded Ray Train workers train exactly as one unsharded worker does.

The 2-worker runs draw the same global rows as the in-process run (``test_multiworker``'s pattern); FSDP
changes where the weights, gradients and optimizer state live, not the maths, so the per-step loss and
gradient norm and the stage-end model (gathered whole to rank 0, saved as a plain model) agree up to
floating-point summation order. A worker killed mid-stage resumes the group from the sharded checkpoint.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from revmix.config import load_config
from revmix.platform.artifacts import CHAIN_FILE
from revmix.platform.checkpoint import CKPT_MARKER, SHARDED, WEIGHTS, latest_checkpoint
from revmix.platform.fsdp import LAYOUT, decoder_layers
from revmix.platform.models import load_model
from tests.platform.test_multiworker import (
    ONE,
    RUNS,
    TWO,
    _assert_rows_split,
    _kill_rank_after,
    _records,
    _train,
)

FSDP = [*TWO, "runtime.strategy=fsdp"]


# ---------------------------------------------------------------- unit (no Ray)


def test_fsdp_needs_ray_workers():
    with pytest.raises(ValueError, match=r"runtime.strategy=fsdp .*runtime.num_workers >= 1"):
        load_config(RUNS / "sft_tiny.yaml", ["runtime.strategy=fsdp", "runtime.num_workers=0"])
    cfg = load_config(RUNS / "sft_tiny.yaml", ["runtime.strategy=fsdp", "runtime.num_workers=2"])
    assert cfg.runtime.strategy == "fsdp"
    assert load_config(RUNS / "sft_tiny.yaml", []).runtime.strategy == "ddp"


@pytest.mark.parametrize(
    ("config", "override", "named"),
    [
        ("ppo_tiny.yaml", [], "samples with the live weights"),
        ("multitask_tiny.yaml", [], "gradient_surgery pcgrad"),
        ("sft_tiny.yaml", ["stages.0.grad_cosine_every=2"], "grad_cosine_every"),
    ],
)
def test_fsdp_refuses_what_it_does_not_cover(config, override, named):
    over = ["runtime.strategy=fsdp", "runtime.num_workers=2", *override]
    with pytest.raises(ValueError, match=named) as err:
        load_config(RUNS / config, over)
    assert "runtime.strategy=ddp" in str(err.value)


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"runtime.strategy: 'zero3' is not one of ddp, fsdp"):
        load_config(RUNS / "sft_tiny.yaml", ["runtime.strategy=zero3"])


def test_decoder_layers_of_qwen2_and_of_its_lora_wrapper():
    from revmix.platform.models import LoraSpec, apply_lora, resolve_model_path

    model = load_model(resolve_model_path(None, "tiny", 0))
    root, layers = decoder_layers(model)
    assert root is model and layers is model.model.layers and len(layers) > 0
    wrapped = apply_lora(model, LoraSpec())
    root, layers = decoder_layers(wrapped)
    assert root is wrapped.get_base_model() and layers is model.model.layers


def test_decoder_layers_refuse_another_layout_naming_the_expected_one():
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Sequential") as err:
        decoder_layers(other)
    assert LAYOUT in str(err.value) and "runtime.strategy=ddp" in str(err.value)


# ---------------------------------------------------------------- 2 CPU workers (gloo)


def _stage_model(run: Path) -> dict[str, torch.Tensor]:
    """The stage-end model as ``load_model`` reads it (a full model, or a LoRA stage's base + adapter), in
    float64."""
    stage = run / "stages" / "0"
    model = load_model(str(stage if (stage / CHAIN_FILE).is_file() else stage / "model"))
    return {k: v.double() for k, v in model.state_dict().items()}


def _assert_same_training(one: Path, two: Path, weights_rel: float = 1e-3) -> None:
    """Per-step loss and gradient norm (rel 1e-4) and every weight of the stage models (difference norm
    within ``weights_rel`` of the tensor's norm: AdamW moves an entry whose gradient is round-off noise by
    up to ~lr, see test_multiworker)."""
    r1, r2 = _records(one), _records(two)
    assert [r["step"] for r in r2] == [r["step"] for r in r1]
    for a, b in zip(r1, r2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-6), a["step"]
    w1, w2 = _stage_model(one), _stage_model(two)
    assert sorted(w1) == sorted(w2) and w1
    start = load_model(str(_start_model(one)))
    moved = 0
    for name, w in w1.items():
        drift = float((w2[name] - w).norm())
        assert drift <= weights_rel * float(w.norm()) + 1e-12, (name, drift, float(w.norm()))
        moved += int(not torch.equal(w.float(), start.state_dict()[name]))
    assert moved, "training changed no weight: the comparison would prove nothing"


def _start_model(run: Path) -> str:
    return json.loads((run / "summary.json").read_text())["model"]


def _assert_sharded_checkpoint(run: Path) -> None:
    """The last checkpoint holds both workers' shards (DCP files) and no full weights file."""
    ckpt = latest_checkpoint(run, 0)
    assert ckpt is not None
    files = json.loads((ckpt / CKPT_MARKER).read_text())["files"]
    assert WEIGHTS not in files
    assert {f"{SHARDED}/.metadata", f"{SHARDED}/__0_0.distcp", f"{SHARDED}/__1_0.distcp"} <= set(files)


@pytest.mark.integration
def test_sft_fsdp_two_workers_equal_one(tmp_path, ray_local):
    """Full fine-tuning: 2 FSDP workers (fp32 on CPU, gloo) equal the in-process unsharded run."""
    over = ["model.lora.enabled=false", "stages.0.steps=3"]
    one = _train(RUNS / "sft_tiny.yaml", tmp_path / "one", [*over, *ONE])
    two = _train(RUNS / "sft_tiny.yaml", tmp_path / "two", [*over, *FSDP])
    _assert_rows_split(one, two, steps=3)
    _assert_same_training(one, two)
    _assert_sharded_checkpoint(two)


@pytest.mark.slow  # about 2 min on 2 busy cores
@pytest.mark.heavy
def test_lora_sft_fsdp_two_workers_equal_one(tmp_path, ray_local):
    """LoRA: the base model's layers are sharded with the adapter inside them; the stage model is merged."""
    over = ["model.lora.enabled=true", "model.lora.dropout=0.0", "stages.0.steps=3"]
    one = _train(RUNS / "sft_tiny.yaml", tmp_path / "one", [*over, *ONE])
    two = _train(RUNS / "sft_tiny.yaml", tmp_path / "two", [*over, *FSDP])
    _assert_rows_split(one, two, steps=3)
    _assert_same_training(one, two)
    _assert_sharded_checkpoint(two)


@pytest.mark.slow
@pytest.mark.heavy
def test_killed_fsdp_worker_resumes_from_sharded_checkpoint(tmp_path, ray_local):
    """Worker 1 SIGKILLed as it starts step 6 of 8 (checkpoints every 2 steps): Ray restarts both workers,
    they reload the sharded checkpoint, and the run ends equal to an uninterrupted one."""
    steps = 8
    over = ["model.lora.enabled=false", f"stages.0.steps={steps}", "stages.0.checkpoint_every=2"]
    one = _train(RUNS / "sft_tiny.yaml", tmp_path / "one", [*over, *ONE])
    two = tmp_path / "two"
    killed: list[int] = []
    killer = threading.Thread(target=_kill_rank_after, args=(two, 1, 6, killed), daemon=True)
    killer.start()
    _train(RUNS / "sft_tiny.yaml", two, [*over, *FSDP, "runtime.max_failures=1"])
    killer.join(timeout=1)
    assert killed, "the worker was never killed"
    trained = [
        json.loads(x)["step"] for x in (two / "stages/0/trace/rows.rank1.jsonl").read_text().splitlines()
    ]
    restart = next(i for i in range(1, len(trained)) if trained[i] <= trained[i - 1])
    assert trained[restart] in (3, 5) and trained[restart:] == list(range(trained[restart], steps + 1))
    assert [r["step"] for r in _records(two)] == list(range(1, steps + 1))  # no duplicate line
    _assert_rows_split(one, two, steps=steps)
    _assert_same_training(one, two)


# ---------------------------------------------------------------- bf16 mixed precision (CUDA)


@pytest.fixture
def one_gpu_group(tmp_path):
    """A 1-process NCCL group on the first GPU: FSDP2's mixed precision without Ray."""
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield torch.device("cuda", 0)
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_mixed_precision_computes_in_bf16_keeps_fp32_shards(one_gpu_group):
    """``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the layers see bf16 weights and
    activations, the sharded parameters and their gradients stay fp32, and the loss is the fp32 model's
    within bf16 rounding."""
    from revmix.platform.fsdp import shard_policy
    from revmix.platform.models import resolve_model_path

    path = resolve_model_path(None, "tiny", 0)
    ids = (torch.arange(4 * 32).reshape(4, 32) % 200 + 5).to(one_gpu_group)
    plain = load_model(path, dtype="float32", device=one_gpu_group)
    expected = float(plain(input_ids=ids, labels=ids).loss)
    model = load_model(path, dtype="float32", device=one_gpu_group)
    shard_policy(model, one_gpu_group, bf16=True)
    seen: list[torch.dtype] = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(m.weight.dtype))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert seen == [torch.bfloat16]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
    assert float(loss) == pytest.approx(expected, rel=2e-2)  # bf16 keeps ~3 significant digits
