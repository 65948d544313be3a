"""Real sweeps on the shared local Ray: two short trials, a failing trial, and a kill -9 + --resume.

Trials are `configs/runs/sft_tiny.yaml` cut to a few steps on 40 items. Evaluation is switched on only
when the evaluation hooks exist (they are being wired); until then the runs train without it.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from revmix.sweeps import results as res
from revmix.sweeps.report import read_metrics
from revmix.sweeps.runner import SweepExistsError, run_sweep
from revmix.sweeps.spec import load_sweep
from tests.sweeps.helpers import ROOT, SFT_TINY
from tests.tracking_readers import series_by_step, wandb_history, wandb_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVAL = importlib.util.find_spec("revmix.platform.evaluation.hooks") is not None
FAST = {
    "stages.0.steps": 3,
    "stages.0.batch_size": 4,
    "stages.0.warmup_steps": 1,
    "stages.0.checkpoint_every": 1,
    "data.n_items": 40,
    "eval.limit": 4,
    "eval.alp_limit": 4,
    "eval.max_new_tokens": 8,
}


def write(tmp_path: Path, name: str = "sweep.yaml", **changes) -> Path:
    raw = {
        "base": str(SFT_TINY),
        "overrides": dict(FAST),
        "metric": "eval/accuracy/synthetic" if EVAL else "final/loss",
        "mode": "max" if EVAL else "min",
        "seeds": [0],
        "space": {"stages.0.mix.reverse_fraction": {"grid": [0.0, 1.0]}},
        "eval": EVAL,
        "tracking": {"tensorboard": True, "mlflow": False},
    }
    raw.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_two_trial_sweep_table_report_and_tracking(ray_local, tmp_path: Path):
    spec = load_sweep(write(tmp_path, tracking=["tensorboard", "mlflow", "wandb"]))  # W&B: offline
    out = run_sweep(spec, tmp_path / "out")
    table = out.table
    assert len(table) == 2 and list(table["status"]) == ["TERMINATED", "TERMINATED"]
    assert sorted(table["stages.0.mix.reverse_fraction"]) == [0.0, 1.0]
    for _, row in table.iterrows():
        r = row["stages.0.mix.reverse_fraction"]
        # the point reached the trial's config: its last batch was drawn at that reverse fraction
        assert row["final/mix/reverse_fraction"] == r and row["reverse_fraction"] == r
        assert math.isfinite(row["final/loss"]) and row["train/steps"] == 3 and row["wall_s"] > 0
        run = tmp_path / "out" / row["run_dir"]
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["seed"] == 0 and cfg["stages"][0]["mix"]["reverse_fraction"] == r
        assert cfg["runtime"]["torch_threads"] == out.resources.torch_threads == 1
        assert [x["step"] for x in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
        tune_dir = tmp_path / "out" / "tune" / row["trial_id"]
        assert glob.glob(str(tune_dir / "events.out.tfevents.*"))  # TensorBoard
    if EVAL:
        assert table["eval/accuracy/synthetic"].between(0, 1).all()
        assert {"eval/alp/forward/margin", "eval/alp/reverse/margin"} <= set(table.columns)
        # one seed: the t interval over seeds is absent and said so; the item bootstrap still has one
        md = (tmp_path / "out" / "report.md").read_text()
        assert (
            "_1 seed: no interval (every condition)" in md and "| eval/accuracy/synthetic (bootstrap) |" in md
        )
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"results.parquet", "results.csv", "report.md", "report.html", "mlflow.db", "spec.json"} <= files
    assert res.read_table(tmp_path / "out").shape == table.shape
    assert (tmp_path / "out" / "plots" / "loss_curves.png").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert all("final/loss" in r.data.metrics for r in runs)
    _check_wandb_trials(tmp_path / "out", spec.name, table)


def _check_wandb_trials(out: Path, sweep: str, table) -> None:
    """One offline W&B run per trial (run id = trial id), grouped by the sweep's name, holding the
    trial's step losses by Tune iteration (one report per step)."""
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    runs = {wandb_run(f).run_id: f for f in files}
    assert sorted(runs) == sorted(table["trial_id"])
    for _, row in table.iterrows():
        run = wandb_run(runs[row["trial_id"]])
        assert run.run_group == sweep and run.project == "revmix"
        steps = read_metrics(out / row["run_dir"] / "metrics.jsonl")
        history = series_by_step(wandb_history(runs[row["trial_id"]]), "loss")
        assert {i: history[i] for i in (1, 2, 3)} == pytest.approx({s["step"]: s["loss"] for s in steps})


def test_a_failing_trial_is_retried_then_recorded(ray_local, tmp_path: Path):
    missing = tmp_path / "no_such_model_dir"  # valid config, fails when the trial loads the model
    spec = load_sweep(
        write(
            tmp_path,
            overrides={**FAST, "model.base": "random", "model.name_or_path": str(missing)},
            space={"stages.0.lr": {"grid": [0.001]}},
        )
    )
    out = run_sweep(spec, tmp_path / "out", write_report=True)
    (row,) = out.table.to_dict("records")
    assert row["status"] == "ERROR" and "no_such_model_dir" in row["error"]
    meta = json.loads((tmp_path / "out" / "trials" / row["trial_id"] / "trial.json").read_text())
    assert meta["attempts"] == 2  # FailureConfig(max_failures=1): one retry, then ERROR
    assert (tmp_path / "out" / "report.html").exists()
    assert "no_such_model_dir" in (tmp_path / "out" / "report.md").read_text()


def _trial_states(out: Path) -> dict[str, str]:
    states = sorted(glob.glob(str(out / "tune" / "experiment_state-*.json")))
    if not states:
        return {}
    try:
        data = json.loads(Path(states[-1]).read_text())
    except (json.JSONDecodeError, OSError):  # caught mid-write
        return {}
    trials = [json.loads(t[0]) for t in data["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.heavy
def test_kill_dash_nine_then_resume_keeps_finished_trials(ray_local, tmp_path: Path):
    path = write(
        tmp_path,
        overrides={**FAST, "stages.0.steps": 4},
        max_concurrent_trials=1,
        tracking={"tensorboard": False, "mlflow": False},
    )
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, killed with it
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "1"
    log = open(tmp_path / "driver.log", "w")
    cmd = [sys.executable, "-m", "revmix.cli", "sweep", str(path), "--out", str(out)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    finished = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            done = [t for t, s in _trial_states(out).items() if s == "TERMINATED"]
            if done:
                finished = done[0]
                break
            time.sleep(0.5)
        assert finished, (
            f"no trial finished in time; driver log:\n{(tmp_path / 'driver.log').read_text()[-3000:]}"
        )
        assert proc.poll() is None, "the sweep ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        deadline = time.time() + 30  # Ray's processes die with their driver (fate sharing)
        while _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.5)
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    console = (tmp_path / "driver.log").read_text()
    # A quiet console by default: no model load/save bars, library FutureWarnings or Tune status tables
    for noise in ("Loading weights", "Writing model shards", "FutureWarning", "╭", "Trial status"):
        assert noise not in console, f"{noise!r} on the default console:\n{console[-3000:]}"
    assert f"revmix sweep {load_sweep(path).name}" in console
    verbose = subprocess.run([*cmd, "--dry-run", "--verbose"], cwd=ROOT, capture_output=True, text=True)
    assert verbose.returncode == 0, verbose.stderr[-2000:]  # the flag that brings the noise back exists

    tdir = out / "trials" / finished
    before = {p: p.stat().st_mtime_ns for p in (tdir / "final.json", tdir / "run" / "metrics.jsonl")}
    final_before = (tdir / "final.json").read_text()
    with pytest.raises(SweepExistsError, match="already exists"):
        run_sweep(load_sweep(path), out)  # without --resume the dir is refused

    result = run_sweep(load_sweep(path), out, resume=True)
    table = result.table
    assert len(table) == 2 and set(table["status"]) == {"TERMINATED"}
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the finished trial was not rerun
    assert (tdir / "final.json").read_text() == final_before
    assert json.loads((tdir / "trial.json").read_text())["attempts"] == 1
    other = next(t for t in table["trial_id"] if t != finished)
    steps = [r["step"] for r in read_metrics(out / "trials" / other / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    assert (out / "report.html").exists()


def test_a_reused_trial_process_gives_the_numbers_of_a_fresh_run(ray_local, tmp_path: Path):
    """Tune's reuse_actors: with one trial at a time the second trial runs in the first one's process;
    each trial's losses equal a plain run of its config in this (test) process, bit for bit."""
    import torch

    from revmix.config import load_config
    from revmix.platform.train import run_experiment

    path = write(tmp_path, eval=False, metric="final/loss", mode="min", max_concurrent_trials=1)
    out = run_sweep(load_sweep(path), tmp_path / "out")
    assert out.resources.concurrency == 1 and list(out.table["status"]) == ["TERMINATED"] * 2
    trials = sorted((tmp_path / "out" / "trials").iterdir())
    pids = {json.loads((t / res.TRIAL_META).read_text())["pid"] for t in trials}
    assert len(pids) == 1  # one process ran both trials
    threads = torch.get_num_threads()
    try:
        for trial in trials:
            run = trial / "run"
            run_experiment(load_config(run / "config.yaml"), tmp_path / trial.name, evaluate=False)
            plain = [r["loss"] for r in read_metrics(tmp_path / trial.name / "metrics.jsonl")]
            assert [r["loss"] for r in read_metrics(run / "metrics.jsonl")] == plain  # exact, not approx
    finally:
        torch.set_num_threads(threads)
