"""Results flattening, rows and the table files: no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from revmix.sweeps import results as res
from revmix.sweeps.spec import parse_sweep
from tests.sweeps.helpers import BASE_RAW, sweep_raw


def _eval(acc: float, fwd: float, rev: float, margin_f: float, margin_r: float) -> dict:
    return {
        "benchmarks": {
            "synthetic": {
                "accuracy": acc,
                "n": 8,
                "by_direction": {"forward": {"accuracy": fwd, "n": 4}, "reverse": {"accuracy": rev, "n": 4}},
            }
        },
        "alp": {
            "forward": {"chosen": -1.0, "rejected": -1.0 - margin_f, "margin": margin_f, "n": 4},
            "reverse": {"chosen": -2.0, "rejected": -2.0 - margin_r, "margin": margin_r, "n": 4},
        },
    }


def _summary(stages: list[dict], ev: dict | None) -> dict:
    return {"stages": stages, "final": stages[-1]["final"], "eval": ev, "steps": 7, "wall_s": 12.5}


def test_flatten_summary_names_and_values():
    final = {"stage": 0, "stage_name": "sft", "step": 4, "epoch": 1.0, "loss": 2.5, "nll/forward": 2.0}
    st = {"final": final, "eval": None, "tokens_per_s": 100.0}
    flat = res.flatten_summary(_summary([st], _eval(0.5, 0.25, 0.75, 1.25, 0.5)))
    assert flat == {
        "final/loss": 2.5,
        "final/nll/forward": 2.0,
        "eval/accuracy/synthetic": 0.5,
        "eval/n/synthetic": 8.0,
        "eval/accuracy/synthetic/forward": 0.25,
        "eval/accuracy/synthetic/reverse": 0.75,
        "eval/alp/forward/chosen": -1.0,
        "eval/alp/forward/rejected": -2.25,
        "eval/alp/forward/margin": 1.25,
        "eval/alp/reverse/chosen": -2.0,
        "eval/alp/reverse/rejected": -2.5,
        "eval/alp/reverse/margin": 0.5,
        "train/steps": 7.0,
        "train/wall_s": 12.5,
        "train/tokens_per_s": 100.0,
        "train/stage0/tokens_per_s": 100.0,
    }


def test_flatten_summary_names_pass_at_k_and_maj_at_k():
    ev = _eval(0.5, 0.25, 0.75, 1.25, 0.5)
    bench = ev["benchmarks"]["synthetic"]
    bench.update({"samples": 4, "pass@1": 0.5, "pass@4": 0.875, "maj@1": 0.375, "maj@4": 0.625})
    bench["by_direction"]["reverse"].update({"pass@1": 0.75, "pass@4": 1.0, "maj@1": 0.5, "maj@4": 0.75})
    flat = res.flatten_summary(_summary([{"final": {"loss": 1.0}, "eval": None}], ev))
    assert {k: v for k, v in flat.items() if "@" in k} == {
        "eval/pass@1/synthetic": 0.5,
        "eval/pass@4/synthetic": 0.875,
        "eval/maj@1/synthetic": 0.375,
        "eval/maj@4/synthetic": 0.625,
        "eval/pass@1/synthetic/reverse": 0.75,
        "eval/pass@4/synthetic/reverse": 1.0,
        "eval/maj@1/synthetic/reverse": 0.5,
        "eval/maj@4/synthetic/reverse": 0.75,
    }
    assert flat["eval/accuracy/synthetic"] == 0.5 and "eval/samples/synthetic" not in flat


def test_flatten_summary_without_eval_and_with_two_stages():
    s0 = {"final": {"step": 3, "loss": 3.0}, "eval": _eval(0.1, 0.1, 0.1, 0.2, 0.3), "tokens_per_s": 10.0}
    s1 = {"final": {"step": 2, "loss": 1.0, "dpo/accuracy": 0.5}, "eval": None, "tokens_per_s": 30.0}
    flat = res.flatten_summary(_summary([s0, s1], None))
    assert flat["final/loss"] == 1.0 and flat["final/dpo/accuracy"] == 0.5
    assert flat["stage0/loss"] == 3.0 and flat["stage0/eval/alp/reverse/margin"] == 0.3
    assert not any(k.startswith("eval/") for k in flat)  # the last stage was not evaluated
    assert flat["train/tokens_per_s"] == 20.0
    assert flat["train/stage0/tokens_per_s"] == 10.0 and flat["train/stage1/tokens_per_s"] == 30.0


def test_short_error_picks_the_exception_line():
    tb = (
        "Traceback (most recent call last):\n  File 'x.py', line 3, in f\n    boom()\n"
        "ValueError: stages.0.lr: expected a number\n\nThe above exception was the direct cause:\n"
        "ray.exceptions.RayTaskError(ValueError): ray::trial_fn()\n  File 'y'\n"
    )
    # Ray's wrapper lines are skipped in favour of the real exception
    assert res.short_error(tb) == "ValueError: stages.0.lr: expected a number"
    assert res.short_error("RuntimeError: out of memory") == "RuntimeError: out of memory"
    assert res.short_error(None) is None
    assert len(res.short_error("ValueError: " + "x" * 1000)) == 300


def test_metric_column_maps_step_metrics_to_final():
    cols = ["final/loss", "eval/accuracy/synthetic"]
    assert res.metric_column("loss", cols) == "final/loss"
    assert res.metric_column("eval/accuracy/synthetic", cols) == "eval/accuracy/synthetic"
    assert res.metric_column("grad_norm", cols) == "grad_norm"  # unknown stays itself


@pytest.fixture
def spec():
    raw = sweep_raw(
        space={
            "stages.0.mix.reverse_fraction": {"grid": [0.0, 1.0]},
            "stages.0.objective": {"grid": [{"name": "sft"}, {"name": "unlikelihood", "alpha": 0.5}]},
        },
        seeds=[0],
    )
    return parse_sweep(raw, "s.yaml", base_raw=BASE_RAW)


def test_rows_table_and_files_round_trip(spec, tmp_path: Path):
    rows = [
        res.make_row(
            spec,
            "t_00001",
            {
                "stages.0.mix.reverse_fraction": 1.0,
                "stages.0.objective": {"name": "unlikelihood", "alpha": 0.5},
            },
            0,
            final={"eval/accuracy/synthetic": 0.75, "final/loss": 1.5, res.FINAL_MARKER: 1.0},
            status=res.STATUS_OK,
            error=None,
            wall_s=3.0,
            run_dir="trials/t_00001/run",
        ),
        res.make_row(
            spec,
            "t_00000",
            {"stages.0.mix.reverse_fraction": 0.0, "stages.0.objective": {"name": "sft"}},
            0,
            final=None,
            status=res.STATUS_ERROR,
            error="RuntimeError: boom",
            wall_s=1.0,
            run_dir="trials/t_00000/run",
        ),
    ]
    df = res.build_table(rows, list(spec.space))
    assert list(df["trial_id"]) == ["t_00000", "t_00001"]
    assert list(df.columns[:9]) == [
        "trial_id",
        "status",
        "stages.0.mix.reverse_fraction",
        "stages.0.objective",
        "seed",
        "model",
        "objective",
        "mix",
        "reverse_fraction",
    ]
    assert list(df.columns[-4:]) == ["wall_s", "error", "run_dir", "node_id"]
    assert res.FINAL_MARKER not in df.columns
    row = df.iloc[1]
    assert row["stages.0.objective"] == "unlikelihood(alpha=0.5)" and row["objective"] == "unlikelihood"
    assert row["reverse_fraction"] == 1.0 and row["model"] == "tiny-tiny" and row["schedule"] == "constant"
    pq, csv = res.write_table(df, tmp_path)
    back = res.read_table(tmp_path)
    assert back.shape == df.shape and back["eval/accuracy/synthetic"].iloc[1] == 0.75
    assert "RuntimeError: boom" in csv.read_text() and pq.stat().st_size > 0

    text = res.summary_text(df, "eval/accuracy/synthetic", "max", paths=list(spec.space))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["trial_id", "status"] and "acc/synthetic" in lines[0]
    assert lines[1].startswith("t_00001") and lines[2].startswith("t_00000")  # best first, NaN last
    assert lines[-1] == "ERROR t_00000: RuntimeError: boom"


def test_rows_from_trial_dirs_infers_status(spec, tmp_path: Path):
    def trial(tid: str, final: dict | None = None, error: str | None = None) -> None:
        d = tmp_path / "trials" / tid
        (d / "run").mkdir(parents=True)
        point = {"stages.0.mix.reverse_fraction": 0.0, "stages.0.objective": {"name": "sft"}}
        (d / "trial.json").write_text(
            json.dumps({"trial_id": tid, "point": point, "seed": 0, "elapsed_s": 2.0})
        )
        if final is not None:
            (d / "final.json").write_text(json.dumps(final))
        if error is not None:
            (d / "error.txt").write_text(error)

    trial("a", final={"final/loss": 1.0})
    trial("b", error="Traceback...\nValueError: bad")
    trial("c")
    df = res.build_table(res.rows_from_trial_dirs(spec, tmp_path), list(spec.space))
    assert dict(zip(df["trial_id"], df["status"])) == {"a": "TERMINATED", "b": "ERROR", "c": "INCOMPLETE"}
    assert df.set_index("trial_id").loc["b", "error"] == "ValueError: bad"
    assert df.set_index("trial_id").loc["a", "run_dir"] == "trials/a/run"


def test_last_step_metrics_skips_a_cut_line(tmp_path: Path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps({"stage": 0, "step": 1, "loss": 3.0}) + "\n" + '{"stage": 0, "step": 2, "lo')
    assert res.last_step_metrics(p) == {"final/loss": 3.0}
    assert res.last_step_metrics(tmp_path / "missing.jsonl") is None


def test_summary_text_shortens_pass_at_k_names():
    import pandas as pd

    df = pd.DataFrame(
        {
            "trial_id": ["a", "b"],
            "status": ["TERMINATED"] * 2,
            "seed": [0, 0],
            "eval/pass@4/synthetic": [0.25, 0.5],
        }
    )
    df["wall_s"] = [1.0, 2.0]
    text = res.summary_text(df, "eval/pass@4/synthetic", "max")
    head, best, second = text.splitlines()
    assert head.split()[3] == "pass@4/synthetic"  # the metric, named as in the report's tables
    assert best.split()[0] == "b" and second.split()[0] == "a"  # best first
