"""Tracking of `revmix train` runs: the `tracking` setting, and what TensorBoard, MLflow and W&B (offline)
hold afterwards, read back with their own readers (tests/tracking_readers.py).

W&B runs in offline mode throughout (the default): it writes files only and needs no network or key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from revmix.config import TRACKERS, ConfigError, load_config
from revmix.platform.run_tracker import STATE, TRACKING_DIR, RunTracker, series
from tests.tracking_readers import series_by_step, tensorboard_scalars, wandb_history, wandb_run

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "configs" / "runs" / "sft_tiny.yaml"
ALL = "tracking=[tensorboard,mlflow,wandb]"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No W&B network even if a test forgot the mode: offline, and no key."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.mark.parametrize(
    ("overrides", "enabled"),
    [
        ([], ["tensorboard"]),  # the default, as sweeps have it
        ([ALL], list(TRACKERS)),
        (["tracking=[wandb]"], ["wandb"]),  # a list switches exactly those on
        (["tracking=[]"], []),
        (["tracking=mlflow"], ["mlflow"]),
        (["tracking.wandb=true"], ["tensorboard", "wandb"]),
        (["tracking.wandb.project=p"], ["tensorboard", "wandb"]),  # giving an option switches it on
        (["tracking.mlflow={enabled: false, experiment_name: x}"], ["tensorboard"]),
    ],
)
def test_tracking_setting(overrides: list[str], enabled: list[str]) -> None:
    assert load_config(SFT, overrides).tracking.enabled == enabled


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "tracking=[tensorbord]",
            "tracking: unknown tracker 'tensorbord'; valid: tensorboard, mlflow, wandb",
        ),
        ("tracking.wandb.mode=cloud", "tracking.wandb.mode: 'cloud' is not one of offline, online, disabled"),
        ("tracking.wandb.projet=p", "unknown key 'projet' at tracking.wandb (did you mean 'project'?)"),
        ("tracking=3", "tracking: expected a mapping"),
    ],
)
def test_bad_tracking_setting_names_the_path(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match="sft_tiny.yaml: ") as err:
        load_config(SFT, [override])
    assert message in str(err.value)


def test_series_are_the_numbers_of_a_record() -> None:
    record = {"stage": 1, "stage_name": "dpo", "step": 3, "loss/forward": 0.5, "ok": True, "n": 2}
    assert series(record) == {"stage": 1.0, "loss/forward": 0.5, "n": 2.0}


def _record(stage: int, step: int) -> dict:
    """A step record as the recipe writes it; values follow from (stage, step) to check them by hand."""
    return {
        "stage": stage,
        "stage_name": f"s{stage}",
        "step": step,
        "loss": 10.0 * stage + step,
        "loss/forward": 0.25 * step,
        "alp/forward/margin": -0.5 * step,
        "mix/reverse_fraction": 0.5,
    }


def _wandb_file(root: Path) -> list[Path]:
    return sorted(root.glob("wandb/offline-run-*/run-*.wandb"))


def test_stages_share_one_axis_and_resume_continues_the_same_runs(tmp_path: Path) -> None:
    cfg = load_config(SFT, [ALL, "name=unit"])
    out = tmp_path / "run"
    out.mkdir()
    tracker = RunTracker(cfg.tracking, out, cfg.name, {"seed": 0})
    for stage, step in [(0, 1), (0, 2), (0, 3), (1, 1)]:
        tracker.log(_record(stage, step))
    tracker.close()
    # --resume in a new process: stage 1 again from its step 1, then on to step 2
    again = RunTracker(cfg.tracking, out, cfg.name, {"seed": 0})
    for stage, step in [(1, 1), (1, 2)]:
        again.log(_record(stage, step))
    again.log_final({"eval/accuracy/synthetic": 0.75})
    again.close()

    root = out / TRACKING_DIR
    state = json.loads((root / STATE).read_text())
    assert state["offsets"] == {"0": 0, "1": 3} and state["last"] == 5
    # stage 1's steps 1, 2 are global steps 4, 5; loss = 10 * stage + step
    want = {1: 1.0, 2: 2.0, 3: 3.0, 4: 11.0, 5: 12.0}
    tb = tensorboard_scalars(root / "tensorboard")
    assert tb["loss"] == pytest.approx(want, rel=1e-6)
    assert tb["alp/forward/margin"] == pytest.approx({1: -0.5, 2: -1.0, 3: -1.5, 4: -0.5, 5: -1.0})
    assert tb["eval/accuracy/synthetic"] == {5: 0.75} and "stage_name" not in tb

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == state["mlflow_run_id"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted({m.step: m.value for m in history}.items()) == sorted(want.items())  # step 4 twice
    assert run.data.params["seed"] == "0"

    files = _wandb_file(root)
    assert len(files) == 2  # one folder per process, the same run id (wandb sync merges them)
    assert {wandb_run(f).run_id for f in files} == {state["wandb_run_id"]}
    first, second = (wandb_history(f) for f in files)
    assert series_by_step(first, "loss") == {1: 1.0, 2: 2.0, 3: 3.0, 4: 11.0}
    assert series_by_step(second, "loss") == {4: 11.0, 5: 12.0}
    assert series_by_step(second, "eval/accuracy/synthetic") == {5: 0.75}
    assert wandb_run(files[0]).project == "revmix" and wandb_run(files[0]).display_name == "unit"


def test_no_record_no_files(tmp_path: Path) -> None:
    """A run refused before its first step (bad --out, data error) leaves no tracking files."""
    cfg = load_config(SFT, [ALL])
    tracker = RunTracker(cfg.tracking, tmp_path, cfg.name, {})
    tracker.log_final({"eval/x": 1.0})
    tracker.close()
    assert list(tmp_path.iterdir()) == []


FAST = [
    "data.n_items=40",
    "stages.0.steps=4",
    "stages.0.batch_size=4",
    "stages.0.warmup_steps=1",
    "eval.limit=2",
    "eval.alp_limit=2",
    "eval.max_new_tokens=4",
    "eval.every_steps=2",  # ALP margins as step series
]


def _train(out: Path, overrides: list[str]) -> int:
    from revmix.platform import train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return train_cli.run(parser.parse_args([str(SFT), *overrides, "--out", str(out)]))


def check_tracked_run(out: Path, experiment: str) -> None:
    """Every tracker holds the run's step series (equal to metrics.jsonl) and its end-of-run evaluation."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [
        "loss",
        "nll/forward",
        "nll/reverse",
        "mix/reverse_fraction",
        "alp/forward/margin",
        "alp/reverse/margin",
    ]
    want = {k: {r["step"]: r[k] for r in records if k in r} for k in keys}
    assert sorted(want["alp/forward/margin"]) == [2, 4] and sorted(want["loss"]) == [1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    accuracy = summary["eval"]["benchmarks"]["synthetic"]["accuracy"]
    root = out / TRACKING_DIR

    tb = tensorboard_scalars(root / "tensorboard")  # float32 in the event file
    for k in keys:
        assert tb[k] == pytest.approx(want[k], rel=1e-6), k
    assert tb["eval/accuracy/synthetic"] == pytest.approx({4: accuracy}, rel=1e-6)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    for k in keys:
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
        assert got == pytest.approx(want[k], rel=1e-12), k

    (file,) = _wandb_file(root)
    history = wandb_history(file)
    for k in keys:
        assert series_by_step(history, k) == pytest.approx(want[k], rel=1e-12), k
    assert series_by_step(history, "eval/accuracy/synthetic") == pytest.approx({4: accuracy})


@pytest.mark.slow
@pytest.mark.heavy
def test_revmix_train_in_process_tracks_to_all_three_quietly(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(out, [*FAST, ALL]) == 0
    console = capfd.readouterr()
    check_tracked_run(out, "sft_tiny")
    text = console.out + console.err
    assert "wandb:" not in text and "Creating initial MLflow database" not in text, text[-3000:]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.heavy
def test_revmix_train_with_ray_workers_tracks_what_the_controller_receives(tmp_path: Path, ray_local) -> None:
    """A Ray Train worker reports; the Train V2 callback hands rank 0's record to the tracker actor."""
    out = tmp_path / "run"
    assert _train(out, [*FAST, ALL, "runtime.num_workers=1", "runtime.cpus_per_worker=0.5"]) == 0
    check_tracked_run(out, "sft_tiny")
