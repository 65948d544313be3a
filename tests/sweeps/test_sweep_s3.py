"""A sweep on a bucket, from the CLI, against a real S3 protocol server (moto on 127.0.0.1).

``revmix sweep FILE --out s3://...`` runs in its own process (and its own Ray) and is killed with SIGKILL
once one trial has finished; ``--resume`` continues it there, keeping the finished trial, and the results
and the report are read back from the bucket (also by ``revmix report s3://...``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from revmix.platform.storage import Store
from revmix.sweeps.runner import SweepExistsError, run_sweep
from revmix.sweeps.spec import load_sweep
from tests.sweeps.helpers import ROOT, SFT_TINY

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.heavy]


def _sweep_file(tmp_path: Path) -> Path:
    raw = {
        "base": str(SFT_TINY),
        "overrides": {
            "stages.0.steps": 3,
            "stages.0.batch_size": 4,
            "stages.0.warmup_steps": 1,
            "stages.0.checkpoint_every": 1,
            "data.n_items": 40,
            "checkpoint.keep_last": 1,
        },
        "metric": "final/loss",
        "mode": "min",
        "seeds": [0],
        "space": {"stages.0.mix.reverse_fraction": {"grid": [0.0, 1.0]}},
        "eval": False,
        "max_concurrent_trials": 1,
        "tracking": {"tensorboard": False, "mlflow": False},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _terminated_trials(store: Store) -> list[str]:
    """Trials Tune's experiment state on the bucket records as TERMINATED (what a resume keeps)."""
    states = [n for n in store.listdir("tune") if n.startswith("experiment_state-") and n.endswith(".json")]
    if not states:
        return []
    try:
        data = json.loads(store.read_text(f"tune/{states[-1]}"))
    except (json.JSONDecodeError, OSError):
        return []
    trials = [json.loads(t[0]) for t in data["trial_data"]]
    return [t["trial_id"] for t in trials if t["status"] == "TERMINATED"]


def _kill_when_one_trial_finished(cmd: list[str], store: Store, log: Path) -> str:
    """Run the CLI sweep; SIGKILL its process group once Tune's state on the bucket has a trial done."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, killed with it
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "1"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            done = _terminated_trials(store)
            if done:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return done[0]
            time.sleep(1)
        raise AssertionError(
            f"no trial finished before the sweep ended or timed out:\n{log.read_text()[-3000:]}"
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_cli_sweep_on_s3_is_killed_resumed_and_reported_from_the_bucket(s3, ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, uri = _sweep_file(tmp_path), s3.uri("sweeps/r")
    store = Store(uri)
    cmd = [sys.executable, "-m", "revmix.cli", "sweep", str(path), "--out", uri]
    finished = _kill_when_one_trial_finished(cmd, store, tmp_path / "driver.log")
    final_before = store.read_text(f"trials/{finished}/final.json")
    assert store.is_file("spec.json") and store.is_file("sweep.yaml")
    assert store.listdir(f"trials/{finished}/run/checkpoints/stage0") == ["step_000003"]  # keep_last: 1
    with pytest.raises(SweepExistsError, match="already exists"):
        run_sweep(load_sweep(path), uri)  # without --resume the bucket folder is refused

    result = run_sweep(load_sweep(path), uri, resume=True)
    assert len(result.table) == 2 and set(result.table["status"]) == {"TERMINATED"}
    assert store.read_text(f"trials/{finished}/final.json") == final_before  # not rerun
    assert json.loads(store.read_text(f"trials/{finished}/trial.json"))["attempts"] == 1
    other = next(t for t in result.table["trial_id"] if t != finished)
    steps = [
        json.loads(line)["step"] for line in store.read_text(f"trials/{other}/run/metrics.jsonl").splitlines()
    ]
    assert steps == [1, 2, 3]
    assert result.report == f"{uri}/report.html" and "final/loss" in store.read_text("report.md")
    assert {"results.csv", "results.parquet", "report.html", "plots"} <= set(store.listdir())

    store.delete_file("report.md")
    again = subprocess.run(
        [sys.executable, "-m", "revmix.cli", "report", uri],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert store.is_file("report.md") and f"{uri}/report.html" in again.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["driver.log", "sweep.yaml"]  # all else: bucket
