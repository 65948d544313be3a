"""Training: the loss falls, resume equals an uninterrupted run, stages chain, Ray workers train."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from revmix.config import load_config
from revmix.platform.train import RunExistsError, run_experiment, stage_plan

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "configs" / "runs" / "sft_tiny.yaml"
SHORT = [
    "data.n_items=60",
    "model.lora.enabled=false",
    "stages.0.batch_size=8",
    "eval.limit=4",
    "eval.alp_limit=4",
]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_stage_plan_counts_examples_not_rows():
    cfg = load_config(SFT, ["stages.0.epochs=2", "stages.0.batch_size=8"])
    plan = stage_plan(cfg.stages[0], n_items=400, n_forward=400, n_reverse=400)
    assert plan["steps"] == 100 and plan["steps_per_epoch"] == 50  # fixed_total: 400 examples per epoch
    cfg = load_config(SFT, ["stages.0.epochs=1", "stages.0.batch_size=8", "stages.0.mix.mode=union"])
    plan = stage_plan(cfg.stages[0], n_items=400, n_forward=400, n_reverse=400)
    assert plan["steps"] == 100 and plan["schedule"].start == 0.5  # union: both directions, twice the data


def test_sft_loss_falls(tmp_path):
    cfg = load_config(SFT, [*SHORT, "stages.0.steps=30", "stages.0.lr=3e-3", "stages.0.warmup_steps=3"])
    summary = run_experiment(cfg, tmp_path / "run", evaluate=False)
    recs = _records(tmp_path / "run")
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-3:]) / 3
    assert len(recs) == 30 and summary["steps"] == 30
    assert last < 0.6 * first, (first, last)  # stated factor: at least 40% lower after 30 steps
    assert {"nll/forward", "nll/reverse", "mix/reverse_fraction", "tokens_per_s"} <= set(recs[-1])
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["stages"][0]["final_by_direction"]["forward"]["nll"] == recs[-1]["nll/forward"]
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_existing_run_refused_without_resume(tmp_path):
    cfg = load_config(SFT, [*SHORT, "stages.0.steps=1"])
    run_experiment(cfg, tmp_path / "run", evaluate=False)
    with pytest.raises(RunExistsError, match="--resume"):
        run_experiment(cfg, tmp_path / "run", evaluate=False)


def _interrupted_after_step_3_then_resumed(cfg, run: Path) -> None:
    def interrupt_after_step_3(record: dict) -> None:
        if record["step"] == 3:
            raise SystemExit("simulated interruption")

    with pytest.raises(SystemExit, match="simulated interruption"):
        run_experiment(cfg, run, evaluate=False, on_report=interrupt_after_step_3)
    run_experiment(cfg, run, evaluate=False, resume=True)


def test_resume_equals_uninterrupted_run(tmp_path):
    over = [*SHORT, "stages.0.steps=6", "stages.0.checkpoint_every=2", "model.lora.enabled=true"]
    cfg = load_config(SFT, over)
    run_experiment(cfg, tmp_path / "full", evaluate=False)
    # Step 3 ran but its checkpoint (every 2) did not: resume restarts from step 2, replaying step 3.
    _interrupted_after_step_3_then_resumed(cfg, tmp_path / "cut")
    full = _records(tmp_path / "full")
    cut_records = _records(tmp_path / "cut")  # the replayed step 3 replaces its first record
    assert [r["step"] for r in cut_records] == [r["step"] for r in full] == list(range(1, 7))
    cut = {r["step"]: r for r in cut_records}
    for r in full:
        c = cut[r["step"]]
        assert (c["mix/n_reverse"], c["mix/n_forward"]) == (r["mix/n_reverse"], r["mix/n_forward"])
        assert c["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6)


def test_two_stages_chain_models(tmp_path):
    cfg = load_config(
        SFT,
        [
            *SHORT,
            "stages.0.steps=2",
            "stages=[{name: a, steps: 2, batch_size: 8}, {name: b, steps: 1, batch_size: 8}]",
        ],
    )
    summary = run_experiment(cfg, tmp_path / "run", evaluate=False)
    assert [s["name"] for s in summary["stages"]] == ["a", "b"]
    assert (tmp_path / "run" / "stages" / "1" / "model" / "config.json").exists()
    assert os.readlink(tmp_path / "run" / "model") == os.path.join("stages", "1", "model")


def _trace(run: Path) -> dict[tuple[int, int], list[str]]:
    """(step, rank) -> the row ids that worker trained on (a replayed step's last record counts)."""
    out: dict[tuple[int, int], list[str]] = {}
    for path in sorted((run / "stages" / "0" / "trace").glob("rows.rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out[rec["step"], rec["rank"]] = rec["rows"]
    return out


@pytest.mark.integration
def test_streamed_data_resumes_on_the_same_examples(tmp_path, ray_local, capsys):
    """Above data.stream_threshold_rows the rows are tokenised in Ray Data and read from the cache entry's
    Parquet a window at a time; a resumed run trains on exactly the examples of an uninterrupted one."""
    over = [
        *SHORT,
        "stages.0.steps=5",
        "stages.0.checkpoint_every=2",
        "data.stream_threshold_rows=0",
        f"data.cache_dir={tmp_path / 'cache'}",
        "runtime.trace=true",
    ]
    cfg = load_config(SFT, over)
    run_experiment(cfg, tmp_path / "full", evaluate=False)
    assert "streamed from Parquet" in capsys.readouterr().out
    _interrupted_after_step_3_then_resumed(cfg, tmp_path / "cut")
    full, cut = _trace(tmp_path / "full"), _trace(tmp_path / "cut")
    assert sorted(full) == [(s, 0) for s in range(1, 6)]
    assert cut == full
    assert len({r for rows in full.values() for r in rows}) > 8  # steps draw different examples
    for a, b in zip(_records(tmp_path / "full"), _records(tmp_path / "cut")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.heavy
def test_two_ray_workers_stream_from_parquet(tmp_path, ray_local):
    over = [*SHORT, "stages.0.steps=3", "runtime.num_workers=2", "runtime.cpus_per_worker=0.5"]
    over += ["data.stream_threshold_rows=0", f"data.cache_dir={tmp_path / 'cache'}", "runtime.trace=true"]
    summary = run_experiment(load_config(SFT, over), tmp_path / "run", evaluate=False)
    recs = _records(tmp_path / "run")
    assert summary["steps"] == 3 and len(recs) == 3
    assert all(r["mix/n_reverse"] + r["mix/n_forward"] == 8 for r in recs)  # the global batch's mix
    trace = _trace(tmp_path / "run")
    for step in range(1, 4):  # every example of a step reaches exactly one worker
        a, b = trace[step, 0], trace[step, 1]
        assert len(a) == len(b) == 4 and not set(a) & set(b)
    assert (tmp_path / "run" / "checkpoints" / "stage0" / "step_000003" / "state.json").exists()


@pytest.mark.slow
def test_cli_kill_and_resume(tmp_path):
    """`revmix train` killed with SIGKILL after its first checkpoint, then `--resume`: same step count."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "revmix.cli", "train", str(SFT), *SHORT, "stages.0.steps=8"]
    args += ["stages.0.checkpoint_every=2", "--out", str(out), "--no-eval"]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 180
    while not (out / "checkpoints" / "stage0" / "step_000002" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # refused without --resume
    done = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8
    assert [r["step"] for r in _records(out)] == list(range(1, 9))  # no duplicate, no torn line
