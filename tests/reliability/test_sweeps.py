"""Sweeps under faults: failed trials fail the command, results survive a full disk, and the trial folders
alone rebuild the results table.

All but the last test work on hand-made sweep directories (no Ray); the last runs one real 2-trial sweep in
which one trial fails at run time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import yaml

from revmix.cli import main
from revmix.sweeps import results as res
from revmix.sweeps.runner import SweepOutcome, collect_results
from revmix.sweeps.spec import parse_sweep
from tests.sweeps.helpers import BASE_RAW, SFT_TINY, sweep_raw, write_sweep

R = "stages.0.mix.reverse_fraction"
NO_PLAN: Any = None  # the CLI reads only the table and the folder of a SweepOutcome


def _spec(tmp_path: Path) -> Any:
    raw = sweep_raw(space={R: {"grid": [0.0, 0.5, 1.0]}}, seeds=[0, 1])
    spec = parse_sweep(raw, tmp_path / "sweep.yaml", base_raw=BASE_RAW)
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    return spec


def _trial(out: Path, tid: str, r: float, files: dict[str, Any]) -> SimpleNamespace:
    """A trial folder as a trial driver leaves it (``files``: relative path → content), and its Tune result."""
    d = out / "trials" / tid
    (d / "run").mkdir(parents=True)
    meta = {"trial_id": tid, "point": {R: r}, "seed": 0, "attempts": 1, "elapsed_s": 2.0, "node_id": "n1"}
    (d / "trial.json").write_text(json.dumps(meta))
    for name, content in files.items():
        (d / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return _result(out, tid, r, 0, error=RuntimeError("boom") if "error.txt" in files else None)


def _result(out: Path, tid: str, r: float, seed: int, error: BaseException | None = None) -> SimpleNamespace:
    return SimpleNamespace(path=str(out / "tune" / tid), config={"point": {R: r}, "seed": seed}, error=error)


def _finished_sweep(out: Path) -> Any:
    """Four trials: finished, failed, stopped early by the scheduler, and failed before its driver ran."""
    spec = _spec(out)
    metrics = "".join(json.dumps({"stage": 0, "step": s, "loss": 3.0 - s}) + "\n" for s in (1, 2))
    grid = [
        _trial(out, "t_a", 0.0, {"final.json": {"final/loss": 1.5, "eval/accuracy/synthetic": 0.5}}),
        _trial(
            out, "t_b", 0.5, {"error.txt": "Traceback (most recent call last):\nValueError: lr went bad\n"}
        ),
        _trial(out, "t_c", 1.0, {"run/metrics.jsonl": metrics}),
        _result(out, "t_d", 1.0, 1, error=RuntimeError("the trial's actor died before it started")),
    ]
    table = collect_results(spec, out, grid)
    res.write_table(table, out)
    return spec, table


def test_report_rebuilds_the_same_results_from_the_trial_folders(tmp_path: Path, capsys) -> None:
    _, table = _finished_sweep(tmp_path)
    statuses = dict(zip(table["trial_id"], table["status"]))
    assert statuses == {"t_a": "TERMINATED", "t_b": "ERROR", "t_c": "STOPPED", "t_d": "ERROR"}
    by_id = table.set_index("trial_id")
    assert by_id.loc["t_c", "final/loss"] == 1.0  # the stopped trial's last logged step
    assert (
        "actor died" in by_id.loc["t_d", "error"] and by_id.loc["t_b", "error"] == "ValueError: lr went bad"
    )
    written = res.read_table(tmp_path)
    for name in ("results.parquet", "results.csv"):
        (tmp_path / name).unlink()

    assert main(["report", str(tmp_path)]) == 0
    assert "results: " in capsys.readouterr().out
    pd.testing.assert_frame_equal(res.read_table(tmp_path), written)
    assert pd.read_csv(tmp_path / "results.csv").shape == written.shape
    assert "ValueError: lr went bad" in (tmp_path / "report.md").read_text()


def test_report_on_a_damaged_table_rewrites_it_from_the_folders(tmp_path: Path) -> None:
    _finished_sweep(tmp_path)
    written = res.read_table(tmp_path)
    (tmp_path / "results.parquet").write_bytes(b"PAR1 cut short")
    assert main(["report", str(tmp_path)]) == 0
    pd.testing.assert_frame_equal(res.read_table(tmp_path), written)


def test_sweep_exits_1_and_lists_each_failed_trial_with_its_error_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _, table = _finished_sweep(out)
    outcome = SweepOutcome(out, table, None, resources=NO_PLAN)
    monkeypatch.setattr("revmix.sweeps.runner.run_sweep", lambda *a, **k: outcome)
    sweep = write_sweep(tmp_path, sweep_raw(space={R: {"grid": [0.0, 0.5, 1.0]}}, seeds=[0, 1]))

    assert main(["sweep", str(sweep), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "2 of 4 trial(s) ended in ERROR" in err
    for tid in ("t_b", "t_d"):
        assert f"{tid}: " in err and str(out / "trials" / tid / "error.txt") in err
        assert (out / "trials" / tid / "error.txt").exists()
    assert "t_a" not in err and "t_c" not in err

    ok = table[table["status"] != "ERROR"]
    monkeypatch.setattr(
        "revmix.sweeps.runner.run_sweep",
        lambda *a, **k: SweepOutcome(out, ok, None, resources=NO_PLAN),
    )
    assert main(["sweep", str(sweep), "--out", str(out)]) == 0


def _disk_full_after(n: int):
    """A writer that puts ``n`` bytes of its output at ``path`` and then fails as a full disk does."""

    def write(data: bytes, path: Any) -> None:
        with open(path, "wb") as fh:
            fh.write(data[:n])
        raise OSError(28, "No space left on device")

    return write


def test_a_full_disk_while_writing_results_keeps_the_previous_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, table = _finished_sweep(tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in ("results.parquet", "results.csv")}
    full = _disk_full_after(10)
    monkeypatch.setattr(
        pd.DataFrame, "to_parquet", lambda self, path, **k: full(self.to_json().encode(), path)
    )
    with pytest.raises(OSError, match="No space left"):
        res.write_table(table, tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda self, path, **k: full(self.to_json().encode(), path))
    with pytest.raises(OSError, match="No space left"):
        res.write_table(table, tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


def test_a_full_disk_while_writing_the_report_keeps_the_previous_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _finished_sweep(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    before = {n: (tmp_path / n).read_bytes() for n in ("report.md", "report.html")}
    full = _disk_full_after(100)
    monkeypatch.setattr(Path, "write_text", lambda self, data, *a, **k: full(data.encode(), self))
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: full(bytes(data), self))
    with pytest.raises(OSError, match="No space left"):
        main(["report", str(tmp_path)])
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------- one real sweep ---


@pytest.mark.integration
@pytest.mark.slow
def test_a_sweep_with_a_trial_failing_at_run_time_exits_1_and_rebuilds(
    ray_local, tmp_path: Path, capsys
) -> None:
    """Grid over the model: ``null`` (the tiny model) trains; a missing folder is a valid path at parse
    time and fails when the trial loads it (after Tune's one retry); once it holds a model,
    ``--resume --retry-errored`` finishes that trial."""
    missing = tmp_path / "no_such_model"
    raw = {
        "base": str(SFT_TINY),
        # a random base: a pretrained one is only for tiny models, and a path names another
        "overrides": {
            "stages.0.steps": 2,
            "stages.0.batch_size": 4,
            "data.n_items": 40,
            "model.base": "random",
        },
        "metric": "final/loss",
        "mode": "min",
        "seeds": [0],
        "space": {"model.name_or_path": {"grid": [None, str(missing)]}},
        "eval": False,
        "tracking": {"tensorboard": False, "mlflow": False},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "out"

    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    table = res.read_table(out)
    by_path = dict(zip(table["model.name_or_path"].fillna("null"), table["status"]))
    assert by_path == {"null": "TERMINATED", str(missing): "ERROR"}
    (failed,) = table.loc[table["status"] == "ERROR", "trial_id"]
    assert "1 of 2 trial(s) ended in ERROR" in err and f"{failed}: " in err
    error_file = out / "trials" / failed / "error.txt"
    assert str(error_file) in err and "no_such_model" in error_file.read_text()

    written = res.read_table(out)
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("results.parquet", "results.csv"):
        shutil.move(out / name, saved / name)
    assert main(["report", str(out)]) == 0
    pd.testing.assert_frame_equal(res.read_table(out), written)
    assert (out / "results.csv").read_text() == (saved / "results.csv").read_text()

    # The cause fixed (the folder now holds the tiny model): --resume keeps the ERROR, --retry-errored
    # runs that trial again and leaves the finished one as it was.
    from revmix.platform.models import tiny_model_dir

    shutil.copytree(tiny_model_dir("tiny", 0), missing)
    finished = (out / "trials").glob("*/run/summary.json")
    before = {p: p.read_bytes() for p in finished}
    path = str(tmp_path / "sweep.yaml")
    assert main(["sweep", path, "--out", str(out), "--resume", "--retry-errored", "--no-report"]) == 0
    assert set(res.read_table(out)["status"]) == {"TERMINATED"}
    assert all(p.read_bytes() == b for p, b in before.items()) and len(before) == 1
