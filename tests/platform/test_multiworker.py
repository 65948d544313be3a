"""Two Ray Train workers train exactly as one worker does at the same global batch.

The Mixer and the per-direction streams are global (rank-independent seeds, every worker reads every
row), each worker keeps a contiguous slice of a step's rows, and micro-batches are cut inside the slices,
so a 2-worker run with ``grad_accum`` g cuts each global batch into the same micro-batches as a 1-worker
run with ``grad_accum`` 2g. Losses are means over micro-batches (each a token- or pair-mean) and gradients
are averaged over micro-batches and workers, so the per-step loss, the update and the final weights agree
up to floating-point summation order. Each test compares a 2-worker run with the in-process (1-worker) run
of the same config and checks, from the row ids each worker logs (``runtime.trace``), that every example
of a step went to exactly one worker.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from revmix.config import load_config
from revmix.platform.checkpoint import WEIGHTS, latest_checkpoint
from revmix.platform.train import run_experiment

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "configs" / "runs"
BATCH = 8
COMMON = [
    "data.n_items=60",
    f"stages.0.batch_size={BATCH}",
    "stages.0.warmup_steps=1",
    "runtime.trace=true",
    "runtime.cpus_per_worker=0.5",
    "eval.limit=4",
    "eval.alp_limit=4",
]
ONE = ["runtime.num_workers=0", "stages.0.grad_accum=2"]  # in-process: one worker, 2 micro-batches of 4
TWO = ["runtime.num_workers=2", "stages.0.grad_accum=1"]  # two workers, one micro-batch of 4 each

pytestmark = pytest.mark.integration


def _train(config: Path, out: Path, overrides: list[str]) -> Path:
    run_experiment(load_config(config, [*COMMON, *overrides]), out, evaluate=False)
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _rows_by_step(run: Path) -> dict[int, dict[int, list[str]]]:
    """step -> rank -> the row ids that worker trained on (a replayed step's last record counts)."""
    out: dict[int, dict[int, list[str]]] = {}
    for path in sorted((run / "stages" / "0" / "trace").glob("rows.rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], {})[rec["rank"]] = rec["rows"]
    return out


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run, 0)
    assert ckpt is not None, f"no checkpoint in {run}"
    return {k: v.double() for k, v in load_file(str(ckpt / WEIGHTS)).items()}


def _assert_rows_split(one: Path, two: Path, steps: int) -> None:
    """Each example of a step reaches exactly one of the two workers, and together they are the 1-worker
    run's examples of that step, in order."""
    single, split = _rows_by_step(one), _rows_by_step(two)
    assert sorted(split) == sorted(single) == list(range(1, steps + 1))
    for step in split:
        mine = split[step]
        assert sorted(mine) == [0, 1] and len(mine[0]) == len(mine[1]) == BATCH // 2, (step, mine)
        assert not set(mine[0]) & set(mine[1]), (step, mine)
        assert mine[0] + mine[1] == single[step][0], step


def _assert_same_training(one: Path, two: Path, weights_rel: float = 1e-3) -> None:
    """Per-step loss and gradient norm, and the final trainable weights, equal within float tolerance
    (measured: loss and grad_norm within rel 1e-6)."""
    r1, r2 = _records(one), _records(two)
    assert [r["step"] for r in r2] == [r["step"] for r in r1]
    for a, b in zip(r1, r2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-6), a["step"]
        assert (b["mix/n_forward"], b["mix/n_reverse"]) == (a["mix/n_forward"], a["mix/n_reverse"])
    w1, w2 = _final_weights(one), _final_weights(two)
    assert sorted(w1) == sorted(w2) and w1
    for name, a in w1.items():
        # Per tensor, the difference's norm within ``weights_rel`` of the weights' norm. Not elementwise: AdamW divides
        # each gradient entry by its own RMS, so an entry whose gradient is cancellation noise (|g| ~ eps)
        # moves by up to ~lr on round-off alone (measured: 2e-4 on one LoRA A entry of 0.09 after 3 steps,
        # DPO at lr 2e-3). Other rows or gradients would move every entry by ~lr: percents of the norm.
        drift = float((w2[name] - a).norm())
        assert drift <= weights_rel * float(a.norm()) + 1e-12, (name, drift, float(a.norm()))


def test_sft_two_workers_equal_one(tmp_path, ray_local):
    over = ["model.lora.enabled=false", "stages.0.steps=3"]
    one = _train(RUNS / "sft_tiny.yaml", tmp_path / "one", [*over, *ONE])
    two = _train(RUNS / "sft_tiny.yaml", tmp_path / "two", [*over, *TWO])
    _assert_rows_split(one, two, steps=3)
    _assert_same_training(one, two)


DPO_STAGE = (
    "stages=[{name: dpo, objective: {name: dpo, beta: 0.1, shared_prompt: true}, lora: true, "
    f"reference: adapter, steps: 3, batch_size: {BATCH}, lr: 2.0e-3, warmup_steps: 1}}]"
)


@pytest.mark.slow  # about 2 min on 2 busy cores
@pytest.mark.heavy
def test_dpo_lora_two_workers_equal_one(tmp_path, ray_local):
    over = [DPO_STAGE, "model.lora.enabled=true", "model.lora.dropout=0.0"]
    one = _train(RUNS / "dpo_tiny.yaml", tmp_path / "one", [*over, *ONE])
    two = _train(RUNS / "dpo_tiny.yaml", tmp_path / "two", [*over, *TWO])
    _assert_rows_split(one, two, steps=3)
    _assert_same_training(one, two)
    assert any("lora_" in name for name in _final_weights(two))  # the adapter is what trained


@pytest.mark.slow  # about 2 min on 2 busy cores
@pytest.mark.heavy
def test_pcgrad_two_workers_equal_one(tmp_path, ray_local):
    """PCGrad projects per micro-batch, before gradients are averaged: the same micro-batches on one or
    two workers give the same projected gradients."""
    over = ["stages.0.steps=3", "stages.0.grad_cosine_every=0"]
    one = _train(RUNS / "multitask_tiny.yaml", tmp_path / "one", [*over, *ONE])
    two = _train(RUNS / "multitask_tiny.yaml", tmp_path / "two", [*over, *TWO])
    _assert_rows_split(one, two, steps=3)
    _assert_same_training(one, two)
    assert all("pcgrad/cosine" in r for r in _records(two))


PPO_STAGE = (
    "stages=[{name: ppo, objective: {name: ppo, baseline: group, group_size: 2, ppo_epochs: 2, "
    "num_mini_batches: 1, loss_aggregation: sequence_mean, entropy_coef: 0.05, max_new_tokens: 6, "
    "rollout_backend: hf, reward: format}, lora: true, reference: adapter, steps: 2, "
    f"batch_size: {BATCH}, lr: 2.0e-3, warmup_steps: 1}}]"
)


@pytest.mark.slow  # 40-65 s on 2 busy cores
@pytest.mark.heavy
def test_ppo_two_workers_equal_one(tmp_path, ray_local):
    """PPO with a group baseline, one mini-batch and row-linear losses: every micro-batch of the global batch
    is sampled with a seed of its place, so both runs roll out the same responses and take the same steps.
    The untrained model earns no reward (advantages 0): the entropy bonus, then the KL, give the gradient;
    its 6-token responses rarely stop early, so the entropy's token mean is a row mean too."""
    over = [PPO_STAGE, "data.families=[affine_mod]", "model.lora.dropout=0.0"]
    one = _train(RUNS / "ppo_tiny.yaml", tmp_path / "one", [*over, *ONE])
    two = _train(RUNS / "ppo_tiny.yaml", tmp_path / "two", [*over, *TWO])
    _assert_rows_split(one, two, steps=2)
    # grad_norm ~4e-3 here: most gradient entries are near AdamW's eps, where round-off moves a weight by
    # up to ~lr (measured: 2e-3 of a LoRA B's norm after 4 optimizer steps; B starts at 0, so its norm is
    # the update's, which other rollouts would change by far more).
    _assert_same_training(one, two, weights_rel=1e-2)
    for a, b in zip(_records(one), _records(two)):
        assert b["ppo/entropy"] == pytest.approx(a["ppo/entropy"], rel=1e-4)  # the same rollouts


def _kill_rank_after(run: Path, rank: int, step: int, killed: list[int], timeout: float = 600) -> None:
    """SIGKILL worker ``rank`` once it has trained ``step`` (read from its trace); its pid goes to ``killed``."""
    trace = run / "stages" / "0" / "trace"
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = trace / f"rows.rank{rank}.jsonl"
        if rows.exists() and any(json.loads(x)["step"] >= step for x in rows.read_text().splitlines()):
            pid = int((trace / f"rank{rank}.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.heavy
def test_killed_worker_restarts_group_from_checkpoint(tmp_path, ray_local):
    """A worker killed mid-stage (as it starts step 6 of 8, checkpoints every 2 steps): Ray Train restarts
    both workers from a reported checkpoint, and the run ends at the same step, on the same rows, losses and
    weights as an uninterrupted run, with no duplicate metrics."""
    steps = 8
    over = ["model.lora.enabled=false", f"stages.0.steps={steps}", "stages.0.checkpoint_every=2"]
    one = _train(RUNS / "sft_tiny.yaml", tmp_path / "one", [*over, *ONE])
    two = tmp_path / "two"
    killed: list[int] = []
    killer = threading.Thread(target=_kill_rank_after, args=(two, 1, 6, killed), daemon=True)
    killer.start()
    _train(RUNS / "sft_tiny.yaml", two, [*over, *TWO, "runtime.max_failures=1"])
    killer.join(timeout=1)
    assert killed, "the worker was never killed"
    assert int((two / "stages" / "0" / "trace" / "rank1.pid").read_text()) != killed[0]  # a new worker
    trained = [
        json.loads(x)["step"] for x in (two / "stages/0/trace/rows.rank1.jsonl").read_text().splitlines()
    ]
    restart = next(i for i in range(1, len(trained)) if trained[i] <= trained[i - 1])
    # Ray registers a reported checkpoint asynchronously: the restart begins after the step-2 or step-4 one.
    assert trained[restart] in (3, 5) and trained[restart:] == list(range(trained[restart], steps + 1)), (
        trained
    )
    assert [r["step"] for r in _records(two)] == list(range(1, steps + 1))  # no duplicate line
    _assert_rows_split(one, two, steps=steps)
    _assert_same_training(one, two)
