"""Runs on a bucket: ``--out s3://...`` against a real S3 protocol server (moto on 127.0.0.1).

Everything the run writes lands in the bucket (nothing in the working folder), an interrupted run resumes
from the checkpoints read back from the bucket, and the driver learns each stage's result from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from revmix.config import load_config
from revmix.platform.storage import Store
from revmix.platform.train import RunExistsError, run_experiment

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "configs" / "runs" / "sft_tiny.yaml"
TWO_STAGES = [
    "data.n_items=40",
    "model.lora.enabled=true",
    "checkpoint.keep_last=1",
    "stages=[{name: a, steps: 2, batch_size: 4, checkpoint_every: 1},"
    " {name: b, steps: 4, batch_size: 4, checkpoint_every: 2}]",
]


def _records(store: Store) -> list[tuple[int, int]]:
    return [(r["stage"], r["step"]) for r in map(json.loads, store.read_text("metrics.jsonl").splitlines())]


@pytest.mark.slow
@pytest.mark.heavy
def test_a_two_stage_run_on_s3_is_interrupted_and_resumes_from_the_bucket(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may appear in the working folder
    cfg = load_config(SFT, TWO_STAGES)
    uri = s3.uri("runs/two")

    def interrupt_in_stage_b(record: dict) -> None:
        if record["stage"] == 1 and record["step"] == 3:
            raise SystemExit("simulated interruption")

    with pytest.raises(SystemExit, match="simulated interruption"):
        run_experiment(cfg, uri, evaluate=False, on_report=interrupt_in_stage_b)
    store = Store(uri)
    assert store.is_file("stages/0/result.json") and not store.exists("stages/1/result.json")
    assert store.listdir("checkpoints/stage1") == ["step_000002"]  # keep_last=1 pruned on the bucket too
    with pytest.raises(RunExistsError, match="--resume"):
        run_experiment(cfg, uri, evaluate=False)

    summary = run_experiment(cfg, uri, evaluate=False, resume=True)
    assert summary["steps"] == 6 and summary["final_model"] == f"{uri}/stages/1"  # an adapter stage
    assert json.loads(store.read_text("summary.json"))["steps"] == 6
    # stage b restarted from its step-2 checkpoint: steps 3-4 ran again, their records once each
    assert _records(store) == [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3), (1, 4)]
    assert store.listdir("checkpoints/stage0") == ["step_000002"]
    assert store.listdir("checkpoints/stage1") == ["step_000004"]
    # LoRA stages keep their adapters only; stage b loaded base + stage a's adapter from the bucket
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(store.listdir("stages/1/adapter"))
    assert not store.exists("stages/0/model") and not store.exists("stages/1/model")
    assert json.loads(store.read_text("stages/1/revmix_chain.json"))["adapters"] == [
        "stages/0/adapter",
        "stages/1/adapter",
    ]
    assert list(tmp_path.iterdir()) == []
    keys = s3.keys("runs/two/")
    assert "runs/two/revmix_run.json" in keys and "runs/two/config.yaml" in keys


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.heavy
def test_a_ray_worker_run_on_s3_reports_through_the_bucket(s3, ray_local, tmp_path, monkeypatch):
    """One Ray Train worker (its own process): its staging folder is its own, the driver reads the bucket."""
    monkeypatch.chdir(tmp_path)
    over = ["data.n_items=40", "stages.0.steps=2", "stages.0.batch_size=4", "stages.0.checkpoint_every=1"]
    over += ["runtime.num_workers=1", "runtime.cpus_per_worker=0.5", "checkpoint.keep_last=1"]
    uri = s3.uri("runs/worker")
    summary = run_experiment(load_config(SFT, over), uri, evaluate=False)
    store = Store(uri)
    assert summary["steps"] == 2 and _records(store) == [(0, 1), (0, 2)]
    assert json.loads(store.read_text("stages/0/result.json"))["steps"] == 2
    assert store.listdir("checkpoints/stage0") == ["step_000002"]
    ray_files = s3.keys("runs/worker/ray/")  # Ray's own copy of the kept checkpoint, on the same bucket
    assert any(k.endswith("step_000002/complete.json") or k.endswith("/complete.json") for k in ray_files)
    assert list(tmp_path.iterdir()) == []
